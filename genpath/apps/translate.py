"""``genpath translate``: H&E → IHC for image tiles and whole slides.

1. Load the translator folder once (:class:`~genpath.pipelines.Translator`).
2. Tiles (PNG/JPEG/TIFF images): translate each (any size), write ``OUT/<name>.<format>``
   atomically and ``OUT/manifest.json``; an unreadable image becomes a ``failed`` row.
3. Slides (anything :func:`~genpath.io.slide.open_slide` reads): stream overlapping windows
   through the translator with feathered blending (the generic slide engine, :mod:`genpath.wsi`), write a
   pyramidal TIFF or OME-Zarr per slide under a temporary name, plus ``OUT/manifest.csv``; a
   failed slide is recorded and the batch goes on.
4. Both write ``OUT/report.html`` (:mod:`genpath.report`): before/after thumbnails per input,
   failed inputs in red, rewritten as the manifest is.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genpath import __version__
from genpath.io.images import expand_inputs, plan_outputs, read_image, write_image
from genpath.report import ReportHeader, SlideBatchReport
from genpath.report.slides import SLIDE_VALUE_COLUMNS
from genpath.report.tiles import TileBatchReport, run_settings_hash
from genpath.utils.logging import get_logger
from genpath.utils.paths import require_output_folder
from genpath.utils.runs import check_run_settings, previous_manifest_outputs
from genpath.wsi import SlideBatchSettings, SlideOptions, expand_slides, run_slide_batch, run_slide_job
from normalization.tiles import TileManifest, refuse_output_collisions, remove_stale_temporaries

logger = get_logger(__name__)


@dataclass
class TranslateOptions:
    """How ``genpath translate`` runs (CLI options)."""

    num_inference_steps: int = 4
    seed: int = 0
    batch_size: int = 8
    output_format: str | None = None  # tiles: png/jpg/tif/same; slides: tiff/ome-zarr
    tile_size: int = 512
    overlap: int = 32
    level: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"steps: expected at least 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")


def translator_fingerprint(translator: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of a translator's weights: a rerun with another model is a new run."""
    import hashlib

    sha = hashlib.sha256()
    if not hasattr(translator, "state_dict"):  # a plain function: its name stands for it
        sha.update(f"{getattr(translator, '__module__', '')}.{getattr(translator, '__qualname__', '')}".encode())
        return sha.hexdigest()[:16]
    for name, tensor in sorted(translator.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def translate_tiles(inputs: list[str], out: Path, translator: torch.nn.Module,
                    output_format: str = "png", on_done: Callable[[], None] | None = None,
                    overwrite: bool = False) -> list[dict]:
    """Translate image files one by one; returns manifest rows (never raises for one bad file).

    Args:
        inputs: image files, folders or globs.
        out: output folder; ``out/manifest.json`` lists every file's status (an earlier run's rows
            for inputs this run does not touch are kept).
        translator: maps a ``(3,H,W)`` H&E image to IHC.
        output_format: ``png``, ``jpg``, ``tif`` or ``same``.
        on_done: called after each file.
        overwrite: replace a previous run in ``out`` made with another model or settings (its
            outputs are removed first); otherwise such a rerun is refused.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: two inputs would write one output (before any work), or ``out/manifest.json``
            is not a tile manifest.
    """
    if output_format not in ("png", "jpg", "tif", "same"):
        raise ValueError(f"output_format: expected one of ('png', 'jpg', 'tif', 'same') for tiles, "
                         f"got {output_format!r}")
    out = Path(out)
    plan = refuse_output_collisions(plan_outputs(expand_inputs(inputs), out, output_format))
    settings = {"weights": translator_fingerprint(translator), "format": output_format,
                "steps": getattr(translator, "num_inference_steps", None), "seed": getattr(translator, "seed", None)}
    check_run_settings(out, "translate tiles", settings, overwrite, previous_manifest_outputs(out))
    manifest = TileManifest(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, plan, extra=("manifest.json", "report.html"))
    header = ReportHeader(title=f"genpath translate tiles: {out.resolve().name}",
                          fields={"model weights": settings["weights"], "steps": settings["steps"],
                                  "seed": settings["seed"], "config hash": run_settings_hash(out),
                                  "version": __version__},
                          image_columns=(("before", "before"), ("after", "after")), swatch_title="",
                          value_columns=(("size", "size"), ("seconds", "seconds")))
    page = TileBatchReport(out, header, manifest.kept)
    records: list[dict] = []
    for path, destination, refused in plan:
        start, image, result = time.perf_counter(), None, None
        try:
            if refused:
                raise ValueError(refused)
            image = read_image(path)
            with torch.inference_mode():
                result = translator(image)
            write_image(result, destination)
            records.append({"input": str(path), "output": str(destination), "status": "translated"})
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch
            records.append({"input": str(path), "status": "failed", "error": f"{type(error).__name__}: {error}"})
        size = f"{image.shape[-1]}x{image.shape[-2]}" if image is not None else ""
        page.add(records[-1], {"before": image, "after": result if records[-1]["status"] != "failed" else None},
                 values={"size": size, "seconds": round(time.perf_counter() - start, 3)})
        if on_done:
            on_done()
        manifest.update(records)
        page.update()
    manifest.flush(records)
    page.flush()
    return records


SLIDE_FIELDS = ("input", "output", "status", "error", "width", "height", "tiles", "seconds", "config_hash")


def translate_slides(inputs: list[str], out: Path, translator: torch.nn.Module, options: TranslateOptions,
                     on_slide: Callable[[dict], None] | None = None,
                     tile_progress: Callable[[int, int], None] | None = None,
                     overwrite: bool = False) -> list[dict]:
    """Translate whole slides into pyramids; returns manifest rows (a failed slide is recorded, not raised).

    The slide engine (:mod:`genpath.wsi`) streams overlapping windows through ``translator``
    with feathered blending; ``out/manifest.csv`` is rewritten after every slide. A rerun with
    the same model and settings resumes (finished slides are skipped); with others it is refused
    unless ``overwrite``, which redoes every slide.
    """
    require_output_folder(out)
    output_format = options.output_format or "tiff"
    slide_options = SlideOptions(tile_size=options.tile_size, overlap=options.overlap, level=options.level,
                                 batch_size=options.batch_size, output_format=output_format, compression="jpeg")
    out = Path(out)
    jobs = expand_slides(inputs, out, output_format)
    record = {"weights": translator_fingerprint(translator), "steps": options.num_inference_steps,
              "seed": options.seed, **{k: v for k, v in slide_options.to_dict().items() if k != "batch_size"}}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    check_run_settings(out, "translate slides", record, overwrite)
    task = functools.partial(_translate_slide, translator, slide_options, options.device, key)
    settings = SlideBatchSettings(key=key, fields=SLIDE_FIELDS, resume=True, overwrite=overwrite)
    header = ReportHeader(title=f"genpath translate slides: {out.resolve().name}",
                          fields={"model weights": record["weights"], "steps": options.num_inference_steps,
                                  "seed": options.seed, "config hash": key, "version": __version__},
                          swatch_title="", value_columns=[c for c in SLIDE_VALUE_COLUMNS if c[0] != "mpp"])
    report = SlideBatchReport(out, header)

    def finished(row: dict) -> None:
        report.refresh()
        if on_slide:
            on_slide(row)

    try:
        return run_slide_batch(jobs, out, task, settings, on_slide=finished, tile_progress=tile_progress)
    finally:
        report.refresh()


def _translate_slide(translator: torch.nn.Module, slide_options: SlideOptions, device: str, key: str,
                     job: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    row = run_slide_job(job, lambda: translator, slide_options, key=key, device=device, progress=progress)
    row["seconds"] = round(row["seconds"], 2)
    return row
