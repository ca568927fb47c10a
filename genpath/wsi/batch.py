"""Many slides: one idempotent task per slide, a manifest with resume, local / process / dask executors.

A *task* is a picklable callable ``task(job, progress=None) -> row`` (for example a
``functools.partial`` of a top-level function with the run's config) that never raises: a
failed slide becomes a row with ``status="failed"`` and the error. :func:`run_slide_job` is
the generic body of such a task. :func:`run_slide_batch` decides which jobs to run (resume),
runs them on an executor and rewrites the manifest CSV atomically after every slide, so an
interrupted run leaves a manifest of what finished.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> task = lambda job, progress=None: {**job, "status": "done", "config_hash": "k"}
    >>> settings = SlideBatchSettings(key="k", fields=("input", "output", "status", "config_hash"))
    >>> rows = run_slide_batch([{"input": "a", "output": str(out / "a.tiff")}], out, task, settings)
    >>> rows[0]["status"], (out / "manifest.csv").is_file()
    ('done', True)
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genpath.utils.atomic import atomic_write_csv
from genpath.utils.logging import get_logger
from genpath.wsi.engine import process_slide
from genpath.wsi.hooks import TileFunction
from genpath.wsi.jobs import output_complete
from genpath.wsi.options import SlideOptions

logger = get_logger(__name__)
SlideTask = Callable[..., dict[str, Any]]


@dataclass
class SlideBatchSettings:
    """How :func:`run_slide_batch` runs (none of this changes a slide's output).

    Attributes:
        key: hash of everything that changes an output; a ``done`` row under another key is redone.
        fields: manifest columns.
        resume: skip slides done under the same key whose output is complete.
        overwrite: redo (and first delete) every output.
        executor: ``"local"`` or ``"dask"``; local with ``workers > 1`` uses processes.
        workers: slides processed in parallel.
        scheduler: dask scheduler address; None starts a local cluster.
        skip_errors: record a failed slide and go on (else stop with ``RuntimeError``).
    """

    key: str
    fields: Sequence[str]
    resume: bool = True
    overwrite: bool = False
    executor: str = "local"
    workers: int = 1
    scheduler: str | None = None
    skip_errors: bool = True


def run_slide_job(
    job: dict[str, Any],
    build_processor: Callable[[], TileFunction],
    options: SlideOptions,
    key: str = "",
    row: dict[str, Any] | None = None,
    mpp: float | None = None,
    resume: bool = True,
    device: str = "cpu",
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Process one job and return its manifest row; never raises for a bad slide.

    Args:
        job: ``{input, output, mpp}`` from :func:`genpath.wsi.jobs.expand_slides`.
        build_processor: returns the tile function (called inside the try, so a processor that
            fails to load fails this row, not the batch; cache it per process to load it once).
        options: slide settings.
        key: the run's config hash (also the OME-Zarr resume key).
        row: extra columns of the row (method, target, version, ...).
        mpp: mpp for slides without metadata (the job's own ``mpp`` wins).
        resume: OME-Zarr: keep tiles an interrupted run wrote under the same key.
        device: where the tile function runs.
        workers: slides running in parallel on this machine (torch threads are shared out).
        progress: tile progress ``(done, total)``.
    """
    import torch

    start = time.perf_counter()
    result_row: dict[str, Any] = {"input": job["input"], "output": job["output"], "status": "failed", "error": "",
                                  "config_hash": key, **(row or {})}
    try:
        from genpath.memory import limit_heap_retention

        limit_heap_retention()
        if Path(job["output"]).resolve() == Path(job["input"]).resolve():
            raise ValueError(f"out: writing {job['output']} would overwrite the input")
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        if torch.get_num_threads() > threads:
            torch.set_num_threads(threads)
        tile_function = build_processor()
        result = process_slide(job["input"], job["output"], tile_function, options, mpp=job.get("mpp") or mpp,
                               resume=resume, progress=progress, device=device, resume_key=key)
        result_row.update(status="done", mpp=result.mpp, width=result.dimensions[0], height=result.dimensions[1],
                          tiles=result.tiles, tissue_tiles=result.tissue_tiles)
    except Exception as error:  # noqa: BLE001 - a failed slide becomes a manifest row
        result_row["error"] = f"{type(error).__name__}: {error}"
        logger.info("slide failed: %s: %s", job["input"], result_row["error"])
    result_row["seconds"] = round(time.perf_counter() - start, 3)
    return result_row


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV (empty if missing)."""
    import csv

    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(path: str | Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write the manifest CSV atomically (temporary file + rename)."""
    return atomic_write_csv(path, rows, fields)


def remove_output(path: Path) -> None:
    """Delete a slide output (file or OME-Zarr folder), if present."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_slide_batch(
    jobs: list[dict[str, Any]],
    out: str | Path,
    task: SlideTask,
    settings: SlideBatchSettings,
    on_slide: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
    tile_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``task`` over ``jobs`` into ``out`` with resume; returns the rows of ``jobs`` (this run's or resumed).

    Args:
        jobs: from :func:`genpath.wsi.jobs.expand_slides`.
        out: output folder (holds ``manifest.csv``).
        task: ``task(job, progress=None) -> row``, picklable for the process and dask executors.
        settings: resume, executor and manifest settings.
        on_slide: called with each finished row (resumed rows carry ``resumed=True``).
        on_start: called as ``(job, index)`` before a slide starts (local, one worker).
        tile_progress: tile progress of the current slide (local, one worker).

    Raises:
        RuntimeError: a slide failed and ``settings.skip_errors`` is False.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.csv"
    previous = {row["input"]: row for row in read_manifest(manifest_path)}
    rows: dict[str, dict[str, Any]] = dict(previous)
    todo = []
    for job in jobs:
        old = previous.get(job["input"])
        done = (old and old.get("status") == "done" and old.get("config_hash") == settings.key
                and output_complete(job["output"]))
        if settings.overwrite or not settings.resume or not done:
            if settings.overwrite:
                remove_output(Path(job["output"]))
            todo.append(job)
        elif on_slide:
            on_slide({**old, "status": "done", "resumed": True})
    logger.info("%d slides, %d to process, %d already done", len(jobs), len(todo), len(jobs) - len(todo))

    def record(row: dict[str, Any]) -> None:
        rows[row["input"]] = row
        write_manifest(manifest_path, rows.values(), settings.fields)
        if on_slide:
            on_slide(row)
        if row["status"] == "failed" and not settings.skip_errors:
            raise RuntimeError(f"slide failed: {row['input']}: {row['error']}")

    if settings.executor == "dask":
        _run_dask(task, todo, settings, record)
    elif settings.workers > 1 and len(todo) > 1:
        _run_processes(task, todo, settings.workers, record)
    else:
        for index, job in enumerate(todo):
            if on_start:
                on_start(job, index)
            record(task(job, progress=tile_progress))
    write_manifest(manifest_path, rows.values(), settings.fields)
    return [rows[job["input"]] for job in jobs]


def _run_processes(task: SlideTask, jobs: list[dict], workers: int, record: Callable[[dict], None]) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(task, job) for job in jobs]
        for future in as_completed(futures):
            record(future.result())


def _run_dask(task: SlideTask, jobs: list[dict], settings: SlideBatchSettings, record: Callable[[dict], None]) -> None:
    """One slide = one dask task; a processor cached per worker process stays loaded between slides."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError("executor: 'dask' needs dask.distributed: pip install 'genpath[dask]'") from error
    cluster = None
    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout=10)
        except (OSError, TimeoutError) as error:
            raise ValueError(f"scheduler: expected a reachable dask scheduler, got {settings.scheduler} "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    else:
        cluster = LocalCluster(n_workers=settings.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    try:
        futures = client.map(task, jobs, pure=False)
        for future in as_completed(futures):
            record(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
