"""Normalize image tiles (PNG/JPEG/TIFF files) in batches: the library side of ``genpath normalize tiles``.

Files are read, grouped by size, normalized together in batches of ``batch_size`` and written
to ``out`` under their relative names (atomically). One bad file becomes a ``failed`` record
and the rest go on; no output is ever written over an input, and two inputs that would write
one output stop the run before any work (:func:`refuse_output_collisions`).
``out/manifest.json`` lists every file's status; it is rewritten atomically every few seconds
and at the end, and keeps the rows of an earlier run for the inputs this run does not touch
(:class:`TileManifest`). Hidden temporary files a killed run left beside this run's outputs
are removed at the start (:func:`remove_stale_temporaries`). ``out/report.html``
(:func:`normalization.report.tile_report`) shows each file's before/after and tissue thumbnails
and its own fitted stain swatches; it is rewritten with the manifest.

The helpers here are shared with ``genpath translate tiles``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from genpath.io.images import expand_inputs, plan_outputs, read_image, write_image
from genpath.report.tiles import TileBatchReport
from genpath.utils.atomic import PeriodicJsonWriter, temporary_in_use
from genpath.utils.logging import get_logger
from normalization.base import StainNormalizer
from normalization.report import report_tiles, tile_report

logger = get_logger(__name__)
TILE_FORMATS = ("png", "jpg", "tif", "same")
#: Pixels held per normalizer call in tile mode (16.8 Mpx: 256 tiles of 256², or one 4096² image).
MAX_BATCH_PIXELS = 2**24


def normalize_tiles(
    inputs: Iterable[str | Path],
    out: str | Path,
    normalizer: StainNormalizer,
    output_format: str = "png",
    batch_size: int = 32,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    max_batch_pixels: int = MAX_BATCH_PIXELS,
    report: bool = True,
    target: Sequence[str | Path] | None = None,
) -> list[dict[str, Any]]:
    """Normalize image files into ``out``; returns one record per file (never raises for one bad file).

    Args:
        inputs: image files, folders (recursive) or glob patterns.
        out: output folder (created); outputs mirror the inputs' relative names.
        normalizer: a fitted normalizer.
        output_format: ``png`` (lossless), ``jpg``, ``tif`` or ``same``.
        batch_size: at most this many files are held and normalized together (same-size tiles
            share one call).
        device: where the normalizer runs.
        progress: called with the number of files just finished.
        max_batch_pixels: and at most this many pixels (a single larger image goes alone), so
            memory is bounded by the budget, not by how many same-size images there are.
        report: write ``out/report.html`` (thumbnails in ``out/report/``).
        target: target image files shown in the report's header.

    Returns:
        Records ``{input, output, status, [error]}`` with ``status`` ``normalized``,
        ``passed_through`` (no usable tissue: pixels kept) or ``failed``.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: ``output_format`` or ``batch_size`` is invalid, two inputs would write one
            output, or ``out/manifest.json`` is not a tile manifest.
    """
    if output_format not in TILE_FORMATS:
        raise ValueError(f"output_format: expected one of {TILE_FORMATS}, got {output_format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(max_batch_pixels, int) or max_batch_pixels < 1:
        raise ValueError(f"max_batch_pixels: expected a positive integer, got {max_batch_pixels!r}")
    out = Path(out)
    plan = refuse_output_collisions(plan_outputs(expand_inputs(inputs), out, output_format))
    manifest = TileManifest(out, plan)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, plan, extra=("manifest.json", "report.html"))
    records: list[dict[str, Any]] = []
    advance = progress or (lambda n: None)
    page = None
    if report:
        try:
            page = tile_report(out, normalizer, manifest.kept, target)
        except Exception as error:  # noqa: BLE001 - the report is a view: never fail the batch for it
            logger.warning("report: not written: %s", error)

    def failed(path: Path, error: Exception | str) -> dict[str, Any]:
        message = error if isinstance(error, str) else f"{error}"
        row = {"input": str(path), "status": "failed", "error": message}
        if page is not None:
            page.add(row)
        return row

    pending: list[tuple[Path, Path, torch.Tensor]] = []

    def flush() -> None:
        groups: dict[tuple[int, ...], list[tuple[Path, Path, torch.Tensor]]] = {}
        for item in pending:
            groups.setdefault(tuple(item[2].shape), []).append(item)
        for items in groups.values():
            records.extend(_normalize_group(items, normalizer, device, page))
            advance(len(items))
        pending.clear()
        manifest.update(records)
        if page is not None:
            page.update()

    for path, destination, refused in plan:
        try:
            if refused:
                raise ValueError(refused)
            image = read_image(path)
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch
            records.append(failed(path, error))
            advance(1)
            continue
        held = sum(item[2].shape[-1] * item[2].shape[-2] for item in pending)
        if pending and held + image.shape[-1] * image.shape[-2] > max_batch_pixels:
            flush()
        pending.append((path, destination, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    manifest.flush(records)
    if page is not None:
        page.flush()
    logger.info("normalized %d files into %s", len(records), out)
    return records


def _normalize_group(
    items: list[tuple[Path, Path, torch.Tensor]], normalizer: StainNormalizer, device: str,
    page: TileBatchReport | None = None,
) -> list[dict[str, Any]]:
    """Normalize same-size tiles in one call and write them; failures become records (and report rows)."""
    images = [image for _, _, image in items]
    start = time.perf_counter()
    try:
        batch = torch.stack(images).to(device)
        result, valid = normalizer(batch, return_valid=True)
    except MemoryError:
        size = tuple(items[0][2].shape[-2:])
        message = f"image: too large to normalize in memory ({size} px)"
        records = [{"input": str(p), "status": "failed", "error": message} for p, _, _ in items]
        result = None
    except Exception as error:  # noqa: BLE001 - report and go on with the next group
        records = [{"input": str(p), "status": "failed", "error": str(error)} for p, _, _ in items]
        result = None
    else:
        result = result.cpu()
        records = []
        for (path, destination, _), image, ok in zip(items, result, valid.tolist(), strict=True):
            try:
                write_image(image, destination)
                records.append({"input": str(path), "output": str(destination),
                                "status": "normalized" if ok else "passed_through"})
            except Exception as error:  # noqa: BLE001
                records.append({"input": str(path), "status": "failed", "error": str(error)})
    if page is not None:
        report_tiles(page, normalizer, images, result, records, (time.perf_counter() - start) / len(items))
    return records


Plan = Sequence[tuple[Path, Path, str | None]]


def refuse_output_collisions(plan: Plan, shown: int = 3) -> list[tuple[Path, Path, str | None]]:
    """Raise before any work when two different input files would write the same output.

    Args:
        plan: ``(file, destination, error)`` rows from :func:`genpath.io.images.plan_outputs`.
        shown: how many colliding pairs the message lists.

    Returns:
        ``plan`` with a file named twice (``a.png`` and ``./a.png``) kept once.

    Raises:
        ValueError: one line listing the first ``shown`` pairs
            (``inputs: expected distinct output names, got a.jpg and a.png both writing out/a.png``).

    Example:
        >>> plan = plan_outputs([(Path("in/a.jpg"), Path("a.jpg")), (Path("in/a.png"), Path("a.png"))], "o", "png")
        >>> refuse_output_collisions(plan)
        Traceback (most recent call last):
        ...
        ValueError: inputs: expected distinct output names, got in/a.jpg and in/a.png both writing o/a.png
    """
    claimed: dict[Path, Path] = {}
    pairs: list[str] = []
    unique = []
    for row in plan:
        path, destination, _ = row
        first = claimed.setdefault(destination.resolve(), path)
        if first is path:
            unique.append(row)
        elif first.resolve() != path.resolve():
            pairs.append(f"{first} and {path} both writing {destination}")
    if pairs:
        more = f" (and {len(pairs) - shown} more)" if len(pairs) > shown else ""
        raise ValueError(f"inputs: expected distinct output names, got {'; '.join(pairs[:shown])}{more}")
    return unique


def remove_stale_temporaries(out: Path, plan: Plan, extra: Iterable[str] = ("manifest.json",),
                             min_age: float = 120.0) -> list[Path]:
    """Delete the hidden temporary siblings (``.<name>.<random><suffix>``) a killed run left beside this run's outputs.

    :func:`genpath.utils.atomic.atomic_path` removes its temporary file on any error; only a
    process killed mid-write (``kill -9``, power loss) leaves one. Only temporaries of outputs
    this run will write (and of ``extra`` names in ``out``) are touched; each folder is listed once.
    A temporary whose name carries the pid of a live process belongs to a run still writing into
    the same folder and is left alone; one without a pid is removed only when older than
    ``min_age`` seconds (they are hidden and never read as inputs).

    Returns:
        The files removed.
    """
    names: dict[Path, set[str]] = {Path(out): set(extra)}
    for _, destination, _ in plan:
        names.setdefault(destination.parent, set()).add(destination.name)
    removed: list[Path] = []
    for folder, wanted in names.items():
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            hidden = [e for e in entries if e.name.startswith(".") and e.is_file(follow_symlinks=False)
                      and not temporary_in_use(e.path, min_age)]
        for entry in hidden:
            body = entry.name[1:]
            dots = [i for i, c in enumerate(body) if c == "."]
            if any(body[:i] in wanted and body.endswith(suffix := Path(body[:i]).suffix)
                   and len(body) - i - 1 > len(suffix) for i in dots):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d temporary files left by an interrupted run in %s", len(removed), out)
    return removed


class TileManifest(PeriodicJsonWriter):
    """``out/manifest.json`` that keeps an earlier run's rows for inputs this run does not touch.

    Rows of the earlier manifest whose input is one of this run's inputs, or whose output is one
    of this run's outputs, are replaced by this run's rows; the rest are kept, first. Written
    atomically, at most every ``interval`` seconds (:meth:`update`) and on :meth:`flush`.

    Raises:
        ValueError: ``out/manifest.json`` exists but is not a tile manifest (a JSON list of rows
            with an ``input``): it is never overwritten.
    """

    def __init__(self, out: str | Path, plan: Plan, interval: float = 5.0) -> None:
        super().__init__(Path(out) / "manifest.json", interval)
        inputs = {path.resolve() for path, _, _ in plan}
        outputs = {destination.resolve() for _, destination, _ in plan}
        self.kept = [row for row in self._previous_rows()
                     if Path(row["input"]).resolve() not in inputs
                     and not (row.get("output") and Path(str(row["output"])).resolve() in outputs)]

    def _previous_rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"out: expected {self.path} to be a tile manifest (JSON), got {error}") from error
        if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("input"), str)
                                                 for r in rows):
            raise ValueError(f"out: expected {self.path} to be a tile manifest (a JSON list of rows with "
                             f"'input'), got {type(rows).__name__} of other content")
        return rows

    def flush(self, data: list[dict[str, Any]]) -> None:
        """Write the kept rows of the earlier run followed by ``data`` now."""
        super().flush([*self.kept, *data])
