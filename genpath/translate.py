"""``genpath translate``: H&E → IHC for image tiles and whole slides.

1. Load the translator folder once (:class:`~genpath.translation.translator.Translator`).
2. Tiles (PNG/JPEG/TIFF images): translate each (any size), write ``OUT/<name>.<format>``
   atomically and ``OUT/manifest.json``; an unreadable image becomes a ``failed`` row.
3. Slides (anything :func:`~genpath.io.slide.open_slide` reads): stream overlapping windows
   through the translator with feathered blending (the slide engine of the normalizer), write a
   pyramidal TIFF or OME-Zarr per slide under a temporary name, plus ``OUT/manifest.csv``; a
   failed slide is recorded and the batch goes on.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


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


def _atomic_json(path: Path, records: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    with os.fdopen(fd, "w") as handle:
        json.dump(records, handle, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _atomic_csv(path: Path, rows: list[dict], fields: tuple[str, ...]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def translate_tiles(files: list[tuple[Path, Path]], out: Path, translator: torch.nn.Module, output_format: str,
                    on_done: Callable[[], None] | None = None) -> list[dict]:
    """Translate image files one by one; returns manifest rows (never raises for one bad file)."""
    from genpath.io.images import read_image, write_image

    resolved = {p.resolve() for p, _ in files}
    records: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    for path, relative in files:
        suffix = relative.suffix if output_format == "same" else f".{output_format}"
        destination = out / relative.with_suffix(suffix)
        try:
            if destination.resolve() in resolved:
                raise ValueError(f"out: writing {destination} would overwrite an input")
            image = read_image(path)
            with torch.inference_mode():
                result = translator(image)
            write_image(result, destination)
            records.append({"input": str(path), "output": str(destination), "status": "translated"})
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch
            records.append({"input": str(path), "status": "failed", "error": f"{type(error).__name__}: {error}"})
        if on_done:
            on_done()
    _atomic_json(out / "manifest.json", records)
    return records


SLIDE_FIELDS = ("input", "output", "status", "error", "width", "height", "tiles", "seconds")


def translate_slides(inputs: list[str], out: Path, translator: torch.nn.Module, options: TranslateOptions,
                     on_slide: Callable[[dict], None] | None = None,
                     tile_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Translate whole slides into pyramids; returns manifest rows (a failed slide is recorded, not raised)."""
    from normalization.batch import expand_slides
    from normalization.slide import SlideOptions, normalize_slide

    output_format = options.output_format or "tiff"
    slide_options = SlideOptions(tile_size=options.tile_size, overlap=options.overlap, level=options.level,
                                 batch_size=options.batch_size, output_format=output_format, compression="jpeg")
    jobs = expand_slides(inputs, out, output_format)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for job in jobs:
        start = time.perf_counter()
        row = {"input": job["input"], "output": job["output"]}
        try:
            result = normalize_slide(job["input"], job["output"], translator, slide_options, mpp=job.get("mpp"),
                                     progress=tile_progress, device=options.device)
            row.update(status="done", width=result.dimensions[0], height=result.dimensions[1], tiles=result.tiles)
        except Exception as error:  # noqa: BLE001 - a failed slide must not kill the batch
            row.update(status="failed", error=f"{type(error).__name__}: {error}")
        row["seconds"] = round(time.perf_counter() - start, 2)
        rows.append(row)
        _atomic_csv(out / "manifest.csv", rows, SLIDE_FIELDS)
        if on_slide:
            on_slide(row)
    return rows
