"""Slide inputs to jobs: files, folders, globs and CSV lists; slide-vs-tile detection; finished outputs.

A job is ``{"input", "output", "mpp"}``. Two inputs that would write the same output (``A/x.svs``
and ``B/x.svs`` given as files, or a CSV naming both) are refused up front: one would silently
replace the other.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpath.io.slide import PLAIN_SUFFIXES, SLIDE_SUFFIXES
from genpath.io.slide_writer import is_complete_ome_zarr


def is_slide_input(path: Path) -> bool:
    """Whether an input path is a slide (rather than a plain image tile).

    Example:
        >>> is_slide_input(Path("a.svs")), is_slide_input(Path("a.png"))
        (True, False)
    """
    name = path.name.lower()
    if path.suffix.lower() == ".csv" or name.endswith(".zarr"):
        return True
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                return bool(tif.pages[0].is_tiled or len(tif.series[0].levels) > 1 or tif.is_ome)
        except Exception:  # noqa: BLE001 - unreadable: a broken tile, not a reason to switch modes
            return False
    return path.suffix.lower() in SLIDE_SUFFIXES


def inputs_hold_slides(inputs: Iterable[str | Path]) -> bool:
    """Whether any input (file, folder searched recursively, glob) is a slide rather than an image tile."""
    for item in inputs:
        path = Path(item)
        if path.is_dir() and not path.name.lower().endswith(".zarr"):
            candidates = [p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES + PLAIN_SUFFIXES]
        elif path.exists():
            candidates = [path]
        else:
            candidates = [Path(m) for m in glob.glob(str(item), recursive=True)]
        if any(is_slide_input(p) for p in candidates if p.suffix.lower() not in PLAIN_SUFFIXES):
            return True
    return False


def slide_output_name(relative: Path, output_format: str) -> Path:
    """Return a slide's relative output path: its name without slide suffixes, plus ``.tiff`` or ``.ome.zarr``.

    Example:
        >>> slide_output_name(Path("a/b.ome.tif"), "ome-zarr").as_posix()
        'a/b.ome.zarr'
    """
    name = relative.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    return relative.with_name(name + (".tiff" if output_format == "tiff" else ".ome.zarr"))


def _csv_jobs(path: Path) -> list[tuple[Path, Path, float | None]]:
    found = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "slide" not in reader.fieldnames:
            raise ValueError(f"inputs: expected a CSV with a 'slide' column (and optional 'mpp'), got {path}")
        for line, record in enumerate(reader, start=2):
            if not record.get("slide"):
                raise ValueError(f"inputs: expected a slide path in {path} line {line}, got an empty cell")
            slide = Path(record["slide"])
            slide = slide if slide.is_absolute() else path.parent / slide
            mpp = None
            if record.get("mpp") not in (None, ""):
                try:
                    mpp = float(record["mpp"])
                except ValueError:
                    mpp = float("nan")
                if not mpp > 0 or mpp == float("inf"):
                    raise ValueError(f"mpp: expected positive microns per pixel in {path} line {line}, "
                                     f"got {record['mpp']!r}")
            found.append((slide, Path(slide.name), mpp))
    return found


def expand_slides(inputs: Iterable[str | Path], out: Path, output_format: str) -> list[dict[str, Any]]:
    """Expand files, folders (recursive), globs and CSV files (``slide,mpp``) into jobs.

    Returns:
        Dicts ``{input, output, mpp}``; ``mpp`` is None unless a CSV gives it.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: a CSV lacks a ``slide`` column or has a bad ``mpp``; two inputs would write
            the same output.
    """
    found: list[tuple[Path, Path, float | None]] = []
    out_resolved = Path(out).resolve()
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".csv" and path.is_file():
            found.extend(_csv_jobs(path))
        elif path.is_dir() and not path.name.lower().endswith(".zarr"):
            for candidate in sorted(path.rglob("*")):
                if candidate.name.startswith(".") or any(p.name.lower().endswith(".zarr") for p in candidate.parents):
                    continue
                if candidate.resolve().is_relative_to(out_resolved):
                    continue  # the output folder inside an input folder: never re-read our own outputs
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
    jobs: list[dict[str, Any]] = []
    claimed: dict[str, str] = {}
    for source, relative, mpp in found:
        output = str(out / slide_output_name(relative, output_format))
        if output in claimed and Path(claimed[output]).resolve() != source.resolve():
            raise ValueError(f"inputs: expected distinct output names, got {claimed[output]} and {source} "
                             f"both writing {output}")
        if output in claimed:
            twin = next(job for job in jobs if job["output"] == output)
            if twin["mpp"] != mpp:
                raise ValueError(f"mpp: expected one mpp per slide, got {twin['mpp']} and {mpp} for {source}")
            continue  # the same slide named twice: one job
        claimed[output] = str(source)
        jobs.append({"input": str(source), "output": output, "mpp": mpp})
    return jobs


def output_complete(output: str | Path) -> bool:
    """Whether a slide output exists and was finished (a renamed TIFF, or a finalized OME-Zarr)."""
    output = Path(output)
    if output.name.lower().endswith(".zarr"):
        return is_complete_ome_zarr(output)
    return output.is_file() and output.stat().st_size > 0
