"""Batch whole-slide normalization: jobs, manifest, resume and executors (local or dask).

A run turns inputs (files, folders, globs, CSV ``slide,mpp``) into jobs ``{input, output, mpp}``.
:func:`process_slide` is one idempotent task, ``(config, job) -> manifest row``: it never raises
(errors become a ``failed`` row), loads the normalizer once per process, and writes its output
under a temporary name, so any executor can run it, retry it or run it twice.

The manifest CSV (one row per slide) is rewritten atomically after every slide, next to the
resolved config (``config.yaml``). A rerun skips slides whose row says ``done`` under the same
config hash and whose output is complete.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from genpath.config import NormalizeConfig
from genpath.io.slide import PLAIN_SUFFIXES, SLIDE_SUFFIXES
from genpath.io.slide_writer import is_complete_ome_zarr

MANIFEST_FIELDS = (
    "input", "output", "status", "error", "mpp", "width", "height", "tiles", "tissue_tiles",
    "method", "target", "config_hash", "seconds", "version",
)
_NORMALIZERS: dict[str, Any] = {}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genpath")
    except PackageNotFoundError:
        return "unknown"


def _file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def config_hash(config: NormalizeConfig) -> str:
    """Hash of everything that changes a slide's output (method, options, target/state *contents*, tiling).

    Execution settings (workers, executor, batch size, device, resume) do not count: outputs
    are independent of them.
    """
    from genpath.io.images import expand_inputs

    relevant = {
        "method": config.method,
        "options": config.options,
        "targets": [_file_digest(p) for p, _ in expand_inputs(config.target)] if config.target else [],
        "state": _file_digest(config.state) if config.state else None,
        "slide": {k: v for k, v in config.slide_options().to_dict().items() if k != "batch_size"},
        "mpp": config.mpp,
        "version": _version(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_slide_input(path: Path) -> bool:
    """Whether an input path is a slide (rather than a plain image tile)."""
    name = path.name.lower()
    if path.suffix.lower() == ".csv" or name.endswith(".zarr"):
        return True
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                return bool(tif.pages[0].is_tiled or len(tif.series[0].levels) > 1 or tif.is_ome)
        except Exception:  # noqa: BLE001 - unreadable: let the slide path report it
            return True
    return path.suffix.lower() in SLIDE_SUFFIXES


def _output_name(relative: Path, output_format: str) -> Path:
    name = relative.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    return relative.with_name(name + (".tiff" if output_format == "tiff" else ".ome.zarr"))


def expand_slides(inputs: Iterable[str | Path], out: Path, output_format: str) -> list[dict[str, Any]]:
    """Expand files, folders (recursive), globs and CSV files (``slide,mpp``) into jobs.

    Returns:
        Dicts ``{input, output, mpp}``; ``mpp`` is None unless a CSV gives it.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: a CSV lacks a ``slide`` column.
    """
    found: list[tuple[Path, Path, float | None]] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "slide" not in reader.fieldnames:
                    raise ValueError(f"inputs: expected a CSV with a 'slide' column (and optional 'mpp'), got {path}")
                for record in reader:
                    slide = Path(record["slide"])
                    slide = slide if slide.is_absolute() else path.parent / slide
                    mpp = float(record["mpp"]) if record.get("mpp") not in (None, "") else None
                    found.append((slide, Path(slide.name), mpp))
        elif path.is_dir() and not path.name.lower().endswith(".zarr"):
            for candidate in sorted(path.rglob("*")):
                if candidate.name.startswith(".") or any(p.name.lower().endswith(".zarr") for p in candidate.parents):
                    continue
                wanted = candidate.is_file() and candidate.suffix.lower() in SLIDE_SUFFIXES + PLAIN_SUFFIXES
                if wanted or (candidate.is_dir() and candidate.name.lower().endswith(".zarr")):
                    found.append((candidate, candidate.relative_to(path), None))
        elif path.exists():
            found.append((path, Path(path.name), None))
        else:
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"inputs: expected a slide file, folder, glob or CSV, got {item!r} (no match)")
            found.extend((m, Path(m.name), None) for m in matches)
    return [
        {"input": str(source), "output": str(out / _output_name(relative, output_format)), "mpp": mpp}
        for source, relative, mpp in found
    ]


def output_complete(output: str | Path) -> bool:
    """Whether a slide output exists and was finished (a renamed TIFF, or a finalized OME-Zarr)."""
    output = Path(output)
    if output.name.lower().endswith(".zarr"):
        return is_complete_ome_zarr(output)
    return output.is_file() and output.stat().st_size > 0


def _normalizer_for(config: NormalizeConfig, key: str):  # noqa: ANN202 - a StainNormalizer
    """Build (or reuse, within this process) the fitted normalizer of a config."""
    if key not in _NORMALIZERS:
        from genpath.io.images import expand_inputs, read_image
        from normalization.base import StainNormalizer, build_normalizer

        if config.state:
            normalizer = StainNormalizer.load(config.state, **config.options)
        elif config.target:
            normalizer = build_normalizer(config.method, **config.options)
            normalizer.fit([read_image(p) for p, _ in expand_inputs(config.target)])
        else:
            raise ValueError("target: expected a target image or a saved state, got neither")
        _NORMALIZERS.clear()
        _NORMALIZERS[key] = normalizer.to(config.device).eval()
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
        job: ``{input, output, mpp}`` from :func:`expand_slides`.
        key: the config hash (computed when None).
        progress: tile progress callback ``(done, total)``.
    """
    import torch

    from normalization.slide import normalize_slide

    key = key or config_hash(config)
    start = time.perf_counter()
    row: dict[str, Any] = {
        "input": job["input"], "output": job["output"], "status": "failed", "error": "",
        "method": config.method, "target": ";".join(config.target) or (config.state or ""),
        "config_hash": key, "version": _version(),
    }
    try:
        from genpath.memory import limit_heap_retention

        limit_heap_retention()
        if Path(job["output"]).resolve() == Path(job["input"]).resolve():
            raise ValueError(f"out: writing {job['output']} would overwrite the input")
        if torch.get_num_threads() > max(1, (os.cpu_count() or 1) // max(1, config.workers)):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.workers)))
        normalizer = _normalizer_for(config, key)
        options = config.slide_options()
        result = normalize_slide(job["input"], job["output"], normalizer, options, mpp=job.get("mpp") or config.mpp,
                                 resume=config.resume, progress=progress, device=config.device, resume_key=key)
        row.update(status="done", mpp=result.mpp, width=result.dimensions[0], height=result.dimensions[1],
                   tiles=result.tiles, tissue_tiles=result.tissue_tiles)
    except Exception as error:  # noqa: BLE001 - a failed slide becomes a manifest row
        row["error"] = f"{type(error).__name__}: {error}"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV (empty if missing)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write the manifest CSV atomically (temporary file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in MANIFEST_FIELDS})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_resolved_config(path: Path, config: NormalizeConfig, key: str) -> None:
    """Write the resolved config (every setting, slide defaults filled in) as YAML, atomically."""
    data = dataclasses.asdict(config)
    excluded = ("batch_size", "output_format")
    data["slide"] = {k: v for k, v in config.slide_options().to_dict().items() if k not in excluded}
    data["output_format"] = config.slide_options().output_format
    text = yaml.safe_dump({"normalize": data, "config_hash": key}, sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".yaml")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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
    fmt = config.slide_options().output_format
    jobs = expand_slides(inputs, out, fmt)
    save_resolved_config(out / "config.yaml", config, key)
    manifest_path = out / "manifest.csv"
    previous = {row["input"]: row for row in read_manifest(manifest_path)}
    rows: dict[str, dict[str, Any]] = dict(previous)
    todo = []
    for job in jobs:
        old = previous.get(job["input"])
        done = old and old.get("status") == "done" and old.get("config_hash") == key and output_complete(job["output"])
        if overwrite or config.resume is False or not done:
            if overwrite:
                _remove_output(Path(job["output"]))
            todo.append(job)
        elif on_slide:
            on_slide({**old, "status": "done", "resumed": True})

    def record(row: dict[str, Any]) -> None:
        rows[row["input"]] = row
        write_manifest(manifest_path, rows.values())
        if on_slide:
            on_slide(row)
        if row["status"] == "failed" and not config.skip_errors:
            raise RuntimeError(f"slide failed: {row['input']}: {row['error']}")

    if config.executor == "dask":
        _run_dask(config, todo, key, record)
    elif config.workers > 1 and len(todo) > 1:
        _run_processes(config, todo, key, record)
    else:
        for index, job in enumerate(todo):
            if on_start:
                on_start(job, index)
            record(process_slide(config, job, key, progress=tile_progress))
    write_manifest(manifest_path, rows.values())
    return [rows[job["input"]] for job in jobs]


def _remove_output(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _run_processes(config: NormalizeConfig, jobs: list[dict], key: str, record: Callable[[dict], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        futures = [pool.submit(process_slide, config, job, key) for job in jobs]
        for future in as_completed(futures):
            record(future.result())


def _run_dask(config: NormalizeConfig, jobs: list[dict], key: str, record: Callable[[dict], None]) -> None:
    """One slide = one dask task; the normalizer is cached per worker process."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError("executor: 'dask' needs dask.distributed: pip install 'genpath[dask]'") from error
    cluster = None
    if config.scheduler:
        client = Client(config.scheduler)
    else:
        cluster = LocalCluster(n_workers=config.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(process_slide, [config] * len(jobs), jobs, [key] * len(jobs), pure=False)
        for future in as_completed(futures):
            record(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
