"""Batch whole-slide normalization: a :class:`~normalization.config.NormalizeConfig` run on the slide engine.

A run turns inputs (files, folders, globs, CSV ``slide,mpp``) into jobs
(:func:`genpath.wsi.expand_slides`). :func:`process_slide` is one idempotent task,
``(config, job) -> manifest row``: it never raises (errors become a ``failed`` row), loads the
normalizer once per process, and writes its output under a temporary name, so any executor can
run it, retry it or run it twice. :func:`run_batch` runs the tasks with
:func:`genpath.wsi.run_slide_batch`: the manifest CSV is rewritten atomically after every
slide, next to the resolved config (``config.yaml``); a rerun skips slides whose row says
``done`` under the same config hash and whose output is complete.

``report.html`` (:class:`genpath.report.SlideBatchReport`) is rewritten beside the manifest
after every slide: before/after and tissue thumbnails, the slide's fitted stain vectors and
percentiles as swatches (each task writes them to ``<output>.qc/report.json``), the target's in
the header.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from genpath import __version__
from genpath.io.images import expand_inputs
from genpath.report import ReportHeader, SlideBatchReport, write_qc_report
from genpath.report.slides import SLIDE_VALUE_COLUMNS
from genpath.utils.atomic import atomic_write_yaml
from genpath.utils.logging import get_logger
from genpath.wsi import SlideBatchSettings, expand_slides, run_slide_batch, run_slide_job
from normalization.base import StainNormalizer
from normalization.config import NormalizeConfig, load_or_fit_normalizer
from normalization.report import RecordingSlideFitter

logger = get_logger(__name__)

__all__ = ["MANIFEST_FIELDS", "config_hash", "expand_slides", "normalizer_for", "process_slide", "run_batch",
           "save_resolved_config"]

MANIFEST_FIELDS = (
    "input", "output", "status", "error", "mpp", "width", "height", "tiles", "tissue_tiles",
    "method", "target", "config_hash", "seconds", "version",
)
_NORMALIZERS: dict[str, StainNormalizer] = {}


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def target_files(target: list[str] | str) -> list:
    try:
        return expand_inputs([target] if isinstance(target, str) else target)
    except FileNotFoundError as error:
        raise FileNotFoundError(str(error).replace("inputs:", "target:", 1)) from None


def config_hash(config: NormalizeConfig) -> str:
    """Hash of everything that changes a slide's output (method, options, target/state *contents*, tiling).

    Execution settings (workers, executor, batch size, device, resume) do not count: outputs
    are independent of them.
    """
    relevant = {
        "method": config.method,
        "options": config.options,
        "targets": [file_digest(p) for p, _ in target_files(config.target)] if config.target else [],
        "state": file_digest(config.state) if config.state else None,
        "slide": {k: v for k, v in config.slide_options().to_dict().items() if k != "batch_size"},
        "mpp": config.mpp,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def normalizer_for(config: NormalizeConfig, key: str) -> StainNormalizer:
    """Build (or reuse, within this process) the fitted normalizer of a config."""
    if key not in _NORMALIZERS:
        normalizer = load_or_fit_normalizer(config.method, config.target, config.state, config.options,
                                            config.device)
        _NORMALIZERS.clear()
        _NORMALIZERS[key] = normalizer
    return _NORMALIZERS[key]


def process_slide(
    config: NormalizeConfig,
    job: dict[str, Any],
    key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Normalize one slide and return its manifest row; never raises for a bad slide.

    Args:
        config: the run config.
        job: ``{input, output, mpp}`` from :func:`genpath.wsi.expand_slides`.
        key: the config hash (computed when None).
        progress: tile progress callback ``(done, total)``.
    """
    key = key or config_hash(config)
    row = {"method": config.method, "target": ";".join(config.target) or (config.state or ""),
           "version": __version__}
    fitters: list[RecordingSlideFitter] = []

    def build() -> RecordingSlideFitter:
        fitters.append(RecordingSlideFitter(normalizer_for(config, key)))
        return fitters[-1]

    options = config.slide_options()
    result = run_slide_job(job, build, options, key=key, row=row, mpp=config.mpp, resume=config.resume,
                           device=config.device, workers=config.workers, progress=progress)
    if result.get("status") == "done" and fitters and options.qc:
        try:
            swatches, target = fitters[-1].swatches()
            write_qc_report(result["output"], swatches, header_swatches=target)
        except (OSError, ValueError) as error:  # the report is a view: never fail a finished slide for it
            logger.info("report: no stain swatches for %s: %s", job["input"], error)
    return result


def save_resolved_config(path: Path, config: NormalizeConfig, key: str) -> None:
    """Write the resolved config (every setting, slide defaults filled in) as YAML, atomically."""
    data = dataclasses.asdict(config)
    excluded = ("batch_size", "output_format")
    data["slide"] = {k: v for k, v in config.slide_options().to_dict().items() if k not in excluded}
    data["output_format"] = config.slide_options().output_format
    atomic_write_yaml(path, {"normalize": data, "config_hash": key})


def run_batch(
    inputs: Iterable[str | Path],
    out: str | Path,
    config: NormalizeConfig,
    overwrite: bool = False,
    on_slide: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
    tile_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Normalize many slides into ``out``; returns the manifest rows of this run's slides.

    Args:
        inputs: files, folders, globs or CSV files.
        out: output folder (``manifest.csv``, ``config.yaml``, outputs and ``*.qc/``).
        config: run config (slide mode: ``output_format`` ``tiff`` or ``ome-zarr``).
        overwrite: redo every slide, even those done under the same config.
        on_slide: called with each finished row (progress).
        on_start: called as ``(job, index)`` before a slide starts (local, one worker).
        tile_progress: tile progress of the current slide (local, one worker).

    Raises:
        RuntimeError: a slide failed and ``config.skip_errors`` is False.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = config_hash(config)
    jobs = expand_slides(inputs, out, config.slide_options().output_format)
    previous = _recorded_hash(out / "config.yaml")
    if previous is not None and previous != key and not overwrite and config.resume is not False:
        raise ValueError(f"out: expected the settings of the run already in {out} (config hash {previous}; or "
                         f"--overwrite), got other settings (config hash {key})")
    save_resolved_config(out / "config.yaml", config, key)
    settings = SlideBatchSettings(key=key, fields=MANIFEST_FIELDS, resume=config.resume is not False,
                                  overwrite=overwrite, executor=config.executor, workers=config.workers,
                                  scheduler=config.scheduler, skip_errors=config.skip_errors)
    # looked up at call time (not bound at import): a patched ``process_slide`` is what runs
    task = functools.partial(_task, config, key)
    report = slide_report(out, config, key)

    def finished(row: dict[str, Any]) -> None:
        report.refresh()
        if on_slide:
            on_slide(row)

    try:
        return run_slide_batch(jobs, out, task, settings, on_slide=finished, on_start=on_start,
                               tile_progress=tile_progress)
    finally:
        report.refresh()


def slide_report(out: Path, config: NormalizeConfig, key: str) -> SlideBatchReport:
    """Set up the ``report.html`` of a slide batch: method, target thumbnail, config hash, version in the header."""
    header = ReportHeader(title=f"genpath normalize slides: {out.resolve().name}",
                          fields={"method": config.method, "target": ", ".join(config.target) or config.state or "",
                                  "config hash": key, "version": __version__},
                          value_columns=SLIDE_VALUE_COLUMNS)
    report = SlideBatchReport(out, header)
    if config.target and not config.state:
        for path, _ in target_files(config.target)[:4]:
            thumbnail = report.report.thumbnail(str(path.resolve()), "target", path)
            if thumbnail:
                header.images[f"target {path.name}"] = thumbnail
    return report


def _recorded_hash(path: Path) -> str | None:
    """Return the config hash a previous run recorded in ``config.yaml`` (None: no previous run)."""
    import yaml

    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return ""
    return str(data.get("config_hash", "")) if isinstance(data, dict) else ""


def _task(config: NormalizeConfig, key: str, job: dict[str, Any],
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    return process_slide(config, job, key, progress=progress)
