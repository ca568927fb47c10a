"""Tile datasets from slides: tissue tiles at a target resolution in one zarr group (TRIDENT/CLAM-style patching).

Layout of ``DATASET.zarr`` (a zarr v3 group):

* ``images``: uint8 ``(N,3,T,T)``, one chunk per tile;
* ``coords``: int64 ``(N,2)``, each tile's top-left corner ``(x, y)`` in level-0 pixels;
* ``slide_index``: int32 ``(N,)``, the tile's row in the ``slides`` table;
* attributes: ``format``, the settings (``mpp``, ``tile_size``, ``min_tissue``,
  ``max_tiles_per_slide``, ``seed``), ``version``, ``layout`` (``"NCHW"``), ``n_tiles`` (committed
  rows) and ``slides``: one ``{path, mpp, width, height, status, error, n_tiles, offset}`` per slide
  (``status`` is ``pending``, ``done`` or ``failed``; a slide's tiles are rows ``offset ... offset + n_tiles``).

One slide: its level-0 mpp comes from a CSV ``slide,mpp`` row (overrides), the metadata, or
``slide_mpp`` (only when the metadata has none; no mpp at all is an error). Level 0 is cut into
tiles of ``tile_size * mpp / slide_mpp`` level-0 pixels (stride = tile, wholly inside the slide);
tiles whose tissue share (the slide engine's tissue mask) is at least ``min_tissue`` are kept,
above ``max_tiles_per_slide`` a subset seeded by ``(seed, slide file name)`` in raster order. Each
is read from the finest level not finer than needed and resized (bilinear, antialiased) to
``tile_size`` unless that level is exactly at ``mpp``.

Resume and parallel runs: the commit point is the group attributes (one atomic ``zarr.json``
write) after each slide. Rows past ``n_tiles`` (a slide interrupted midway) are cut off when the
dataset is opened again, and that slide is redone; a failed slide is recorded and retried by the
next run. With one local worker each slide is appended in place; with ``workers > 1`` or dask
each slide is written by a worker into its own part ``_parts/<index>`` (disjoint), and the main
process appends the parts in slide order, so the arrays equal a one-worker run's.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from genpath.io.slide import SlideReader, open_slide
from genpath.tissue import detect_tissue, tile_tissue_fraction
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

FORMAT = "genpath-tile-dataset"
SETTINGS_KEYS = ("mpp", "tile_size", "min_tissue", "max_tiles_per_slide", "seed")
READ_BATCH = 32
SlideCallback = Callable[[dict[str, Any]], None]


@dataclass
class TileDatasetConfig:
    """A ``genpath tiles`` run.

    Attributes:
        inputs: slide files, folders, globs or CSV files (``slide,mpp``).
        out: the dataset folder (``.zarr``).
        mpp: target microns per pixel of the tiles.
        tile_size: tile side in pixels at ``mpp``.
        min_tissue: lowest tissue share of a kept tile (0 keeps every tile).
        max_tiles_per_slide: keep at most this many tiles per slide (a seeded subset); None: all.
        seed: seed of that subset.
        slide_mpp: level-0 mpp of slides whose metadata has none.
        executor: ``"local"`` or ``"dask"``.
        workers: slides processed in parallel.
        scheduler: dask scheduler address (None: a local cluster).
        overwrite: delete an existing dataset at ``out`` and start over.
    """

    inputs: list[str]
    out: str
    mpp: float = 0.5
    tile_size: int = 256
    min_tissue: float = 0.5
    max_tiles_per_slide: int | None = None
    seed: int = 0
    slide_mpp: float | None = None
    executor: str = "local"
    workers: int = 1
    scheduler: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("slides: expected at least one slide, folder, glob or CSV, got none")
        if not (isinstance(self.mpp, int | float) and math.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"mpp: expected a finite positive number of microns per pixel, got {self.mpp}")
        if not 16 <= self.tile_size <= 8192:
            raise ValueError(f"tile-size: expected 16..8192 pixels, got {self.tile_size}")
        if not (math.isfinite(self.min_tissue) and 0.0 <= self.min_tissue <= 1.0):
            raise ValueError(f"min-tissue: expected a share in [0, 1], got {self.min_tissue}")
        if self.max_tiles_per_slide is not None and self.max_tiles_per_slide < 1:
            raise ValueError(f"max-tiles-per-slide: expected a positive integer, got {self.max_tiles_per_slide}")
        if self.slide_mpp is not None and not (math.isfinite(self.slide_mpp) and self.slide_mpp > 0):
            raise ValueError(f"slide-mpp: expected a finite positive number of microns per pixel, got {self.slide_mpp}")
        if self.executor not in ("local", "dask"):
            raise ValueError(f"executor: expected 'local' or 'dask', got {self.executor!r}")
        if self.workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {self.workers}")

    def settings(self) -> dict[str, Any]:
        """Return the settings that decide the tiles (recorded in the dataset; a rerun must match them)."""
        return {key: getattr(self, key) for key in SETTINGS_KEYS}


@dataclass
class SlidePlan:
    """A slide's tiles: ``coords`` ``(k,2)`` level-0 ``(x, y)``, read at ``level`` as ``read_size``² pixels."""

    mpp: float
    width: int
    height: int
    level: int
    read_size: int
    coords: np.ndarray


def open_slide_with_mpp(path: str | Path, mpp: float | None = None, fallback: float | None = None) -> SlideReader:
    """Open a slide whose level-0 mpp is known: ``mpp`` overrides, ``fallback`` stands in for missing metadata.

    Raises:
        ValueError: unreadable slide, or no mpp from any source.
    """
    reader = open_slide(path, mpp=mpp)
    if reader.mpp is None:
        reader.close()
        if fallback is None:
            raise ValueError(f"mpp: expected microns-per-pixel metadata in {path}, got none "
                             "(pass --slide-mpp or list it in a CSV slide,mpp)")
        reader = open_slide(path, mpp=fallback)
    return reader


def subset_indices(n: int, limit: int | None, seed: int, key: str) -> np.ndarray:
    """Return the indices of a seeded subset of ``limit`` out of ``n`` (all when ``n <= limit``), sorted.

    Example:
        >>> subset_indices(5, None, 0, "a").tolist(), len(subset_indices(100, 7, 0, "a"))
        ([0, 1, 2, 3, 4], 7)
    """
    if limit is None or n <= limit:
        return np.arange(n)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n, size=limit, replace=False))


def plan_tiles(reader: SlideReader, settings: dict[str, Any]) -> SlidePlan:
    """Grid, tissue and subset of one slide (see the module doc); ``reader.mpp`` must be known."""
    from genpath.wsi.engine import tissue_downsample
    from genpath.wsi.options import SlideOptions

    mpp0 = float(reader.mpp[0])
    downsample = settings["mpp"] / mpp0
    if downsample < 1 - 1e-6:
        logger.warning("%s: %.3f µm/px is finer than the slide's %.3f µm/px: tiles are upsampled",
                       reader.path, settings["mpp"], mpp0)
    span = settings["tile_size"] * downsample  # level-0 pixels per tile
    width, height = reader.dimensions
    cols, rows = int(math.floor(width / span + 1e-9)), int(math.floor(height / span + 1e-9))
    side = max(1, round(span))
    coords = np.zeros((0, 2), np.int64)
    if cols and rows:
        mask_ds = tissue_downsample(reader, SlideOptions())
        mask = detect_tissue(reader.thumbnail(mask_ds))
        mask_ds = width / mask.shape[1]
        grid = [(round(c * span), round(r * span)) for r in range(rows) for c in range(cols)]
        kept = [xy for xy in grid if tile_tissue_fraction(mask, mask_ds, xy, (side, side)) >= settings["min_tissue"]]
        coords = np.asarray(kept, np.int64).reshape(-1, 2)
        coords = coords[subset_indices(len(coords), settings["max_tiles_per_slide"], settings["seed"],
                                       reader.path.name)]
    level = reader.best_level_for_downsample(downsample)
    read_size = max(1, round(span / reader.level_downsamples[level]))
    return SlidePlan(mpp0, width, height, level, read_size, coords)


def read_tiles(reader: SlideReader, plan: SlidePlan, tile_size: int, start: int, stop: int) -> np.ndarray:
    """Tiles ``start:stop`` of ``plan`` as uint8 ``(b,3,T,T)``."""
    import torch
    import torch.nn.functional as F

    s = plan.read_size
    regions = np.stack([reader.read_region((int(x), int(y)), plan.level, (s, s)) for x, y in plan.coords[start:stop]])
    batch = torch.from_numpy(regions).permute(0, 3, 1, 2)
    if s != tile_size:
        batch = F.interpolate(batch.float(), size=(tile_size, tile_size), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(batch.numpy())


# ---------------------------------------------------------------------------------------------- the dataset


def dataset_attrs(path: str | Path) -> dict[str, Any] | None:
    """Return the attributes of a tile dataset at ``path``, or None when it is not one."""
    import zarr

    try:
        attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    except (OSError, ValueError, KeyError, TypeError, zarr.errors.GroupNotFoundError):
        return None
    return attrs if attrs.get("format") == FORMAT else None


def open_tile_dataset(path: str | Path, mode: str = "r"):  # noqa: ANN201 - a zarr.Group
    """Open a dataset made by ``genpath tiles``; a one-line error for anything else."""
    import zarr

    if dataset_attrs(path) is None:
        raise ValueError(f"dataset: expected a tile dataset made by 'genpath tiles' (a zarr group with images, "
                         f"coords, slide_index), got {path}")
    return zarr.open_group(str(path), mode=mode)


def _prepare(cfg: TileDatasetConfig, jobs: list[dict[str, Any]]):  # noqa: ANN202 - a zarr.Group
    """Create, check (settings, inputs) or reset the dataset; cut uncommitted rows."""
    import zarr

    from genpath import __version__

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a dataset folder (.zarr), got the existing file {out}")
    for job in jobs:
        if Path(job["input"]).resolve().is_relative_to(out.resolve()):
            raise ValueError(f"out: expected a folder apart from the inputs, got {out} holding input {job['input']}")
    if out.is_dir() and any(out.iterdir()):
        attrs = dataset_attrs(out)
        if attrs is None:
            raise ValueError(f"out: expected a new folder or a dataset made by 'genpath tiles', got {out} "
                             "(it holds other files)")
        differing = [k for k in SETTINGS_KEYS if attrs.get(k) != cfg.settings()[k]]
        if cfg.overwrite:
            shutil.rmtree(out)
        elif differing:
            k = differing[0]
            raise ValueError(f"{k.replace('_', '-')}: expected {attrs.get(k)} as in the dataset {out}, got "
                             f"{cfg.settings()[k]} (pass --overwrite to start over)")
    group = zarr.open_group(str(out), mode="a")
    if group.attrs.get("format") != FORMAT:
        group.attrs.update({"format": FORMAT, **cfg.settings(), "version": __version__, "layout": "NCHW",
                            "n_tiles": 0, "slides": []})
    _create_arrays(group, cfg.tile_size)  # those a run killed right after the attributes did not create
    _resize(group, int(group.attrs["n_tiles"]))
    return group


def _create_arrays(group, tile_size: int) -> None:  # noqa: ANN001 - zarr.Group
    t = tile_size
    for name, shape, chunks, dtype in (("images", (0, 3, t, t), (1, 3, t, t), "uint8"),
                                       ("coords", (0, 2), (4096, 2), "int64"), ("slide_index", (0,), (4096,), "int32")):
        if name not in group:
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)


def _resize(group, n: int) -> None:  # noqa: ANN001 - zarr.Group
    for name in ("images", "coords", "slide_index"):
        array = group[name]
        if array.shape[0] != n:
            array.resize((n, *array.shape[1:]))


def _slide_row(path: str, status: str = "pending", error: str = "", plan: SlidePlan | None = None,
               offset: int = 0) -> dict[str, Any]:
    return {"path": path, "mpp": plan.mpp if plan else None, "width": plan.width if plan else None,
            "height": plan.height if plan else None, "status": status, "error": error,
            "n_tiles": len(plan.coords) if plan and status == "done" else 0, "offset": offset}


def _write_slide(job: dict[str, Any], settings: dict[str, Any], slide_mpp: float | None, group, offset: int,
                 progress: Callable[[int, int], None] | None = None) -> SlidePlan:  # noqa: ANN001
    """Write one slide's tiles into ``group``'s arrays from row ``offset`` on (resized to fit)."""
    with open_slide_with_mpp(job["input"], job.get("mpp"), slide_mpp) as reader:
        plan = plan_tiles(reader, settings)
        k = len(plan.coords)
        _resize(group, offset + k)
        images = group["images"]
        for start in range(0, k, READ_BATCH):
            stop = min(start + READ_BATCH, k)
            images[offset + start : offset + stop] = read_tiles(reader, plan, settings["tile_size"], start, stop)
            if progress:
                progress(stop, k)
        if k:
            group["coords"][offset : offset + k] = plan.coords
            group["slide_index"][offset : offset + k] = np.full(k, job["index"], np.int32)
    return plan


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_slide_part(job: dict[str, Any], settings: dict[str, Any], slide_mpp: float | None = None,
                     workers: int = 1) -> dict[str, Any]:
    """Worker task: write one slide into its own part ``job["part"]``; returns its slides-table row (never raises)."""
    import torch
    import zarr

    try:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
        if torch.get_num_threads() > threads:
            torch.set_num_threads(threads)
        part = zarr.open_group(job["part"], mode="w")
        _create_arrays(part, settings["tile_size"])
        plan = _write_slide(job, settings, slide_mpp, part, 0)
        row = _slide_row(job["path"], "done", plan=plan)
        part.attrs.update({"row": row})  # marks the part complete
    except Exception as error:  # noqa: BLE001 - a failed slide becomes a row
        row = _slide_row(job["path"], "failed", _one_line(error))
        shutil.rmtree(job["part"], ignore_errors=True)
    return row


def _append_part(group, part_path: str, offset: int) -> int:  # noqa: ANN001 - zarr.Group
    import zarr

    part = zarr.open_group(part_path, mode="r")
    k = part["images"].shape[0]
    _resize(group, offset + k)
    images, source = group["images"], part["images"]
    for start in range(0, k, 256):
        stop = min(start + 256, k)
        images[offset + start : offset + stop] = source[start:stop]
    if k:
        group["coords"][offset : offset + k] = part["coords"][:]
        group["slide_index"][offset : offset + k] = part["slide_index"][:]
    return k


def run_tile_dataset(
    cfg: TileDatasetConfig,
    on_slide: SlideCallback | None = None,
    tile_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Build (or resume) the dataset of ``cfg``; returns the slides-table rows of ``cfg.inputs``.

    Args:
        cfg: the run.
        on_slide: called with each slide's row as it is committed (resumed ones carry ``resumed=True``).
        tile_progress: ``(done, total)`` tiles of the current slide (local executor, one worker).

    Raises:
        ValueError: bad inputs or ``out`` (a file, another folder, other settings without ``overwrite``).
        FileNotFoundError: an input matches nothing.
    """
    from genpath.wsi.jobs import expand_slides

    jobs = expand_slides(cfg.inputs, Path(cfg.out), "ome-zarr")
    group = _prepare(cfg, jobs)
    slides: list[dict[str, Any]] = list(group.attrs["slides"])
    where = {row["path"]: i for i, row in enumerate(slides)}
    todo = []
    for job in jobs:
        path = str(Path(job["input"]).resolve())
        if path not in where:
            where[path] = len(slides)
            slides.append(_slide_row(path))
        job.update(path=path, index=where[path], part=str(Path(cfg.out) / "_parts" / str(where[path])))
        if slides[job["index"]]["status"] == "done":
            if on_slide:
                on_slide({**slides[job["index"]], "resumed": True})
        else:
            todo.append(job)
    state = {"n": int(group.attrs["n_tiles"])}

    def commit(job: dict[str, Any], row: dict[str, Any]) -> None:
        slides[job["index"]] = row
        state["n"] += row["n_tiles"]
        group.attrs.update({"slides": slides, "n_tiles": state["n"]})  # one atomic write: the commit point
        if on_slide:
            on_slide(row)

    group.attrs.update({"slides": slides})
    logger.info("%d slides, %d to tile into %s", len(jobs), len(todo), cfg.out)
    settings = cfg.settings()
    if cfg.executor == "local" and cfg.workers == 1:
        for job in todo:
            n0 = state["n"]
            try:
                plan = _write_slide(job, settings, cfg.slide_mpp, group, n0, tile_progress)
                row = _slide_row(job["path"], "done", plan=plan, offset=n0)
            except Exception as error:  # noqa: BLE001 - a failed slide becomes a row
                _resize(group, n0)
                row = _slide_row(job["path"], "failed", _one_line(error))
            commit(job, row)
    else:
        _run_parallel(cfg, todo, group, state, commit)
    shutil.rmtree(Path(cfg.out) / "_parts", ignore_errors=True)  # parts are removed once appended
    return [slides[job["index"]] for job in jobs]


def _run_parallel(cfg: TileDatasetConfig, todo: list[dict[str, Any]], group, state: dict[str, int],
                  commit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:  # noqa: ANN001
    """Workers write parts; the main process appends them in slide order (finished parts are reused)."""
    import zarr

    from genpath.wsi.batch import SlideBatchSettings, _run_dask, _run_processes

    group.require_group("_parts")
    results: dict[int, dict[str, Any]] = {}
    run = []
    for job in todo:
        previous = None
        if Path(job["part"]).is_dir():
            previous = zarr.open_group(job["part"], mode="r").attrs.get("row")
        if previous and previous.get("status") == "done":
            results[job["index"]] = previous  # written by an interrupted run, not yet appended
        else:
            shutil.rmtree(job["part"], ignore_errors=True)
            run.append(job)
    pending = list(todo)
    by_path = {job["path"]: job["index"] for job in run}

    def flush() -> None:
        while pending and pending[0]["index"] in results:
            job = pending.pop(0)
            row = dict(results.pop(job["index"]))
            if row["status"] == "done":
                n0 = state["n"]
                row["n_tiles"], row["offset"] = _append_part(group, job["part"], n0), n0
            commit(job, row)
            shutil.rmtree(job["part"], ignore_errors=True)

    def record(row: dict[str, Any]) -> None:
        results[by_path[row["path"]]] = row
        flush()

    flush()  # parts an interrupted run finished
    task = functools.partial(write_slide_part, settings=cfg.settings(), slide_mpp=cfg.slide_mpp,
                             workers=cfg.workers)
    if run and cfg.executor == "dask":
        batch = SlideBatchSettings(key="", fields=(), executor="dask", workers=cfg.workers, scheduler=cfg.scheduler)
        _run_dask(task, run, batch, record)
    elif run:
        _run_processes(task, run, cfg.workers, record)
