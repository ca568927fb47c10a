"""Normalize image tiles (PNG/JPEG/TIFF files) in batches: the library side of ``genpath normalize tiles``.

Files are read, grouped by size, normalized together in batches of ``batch_size`` and written
to ``out`` under their relative names (atomically). One bad file becomes a ``failed`` record
and the rest go on; no output is ever written over an input or over another input's output.
``out/manifest.json`` lists every file's status; it is rewritten atomically every few seconds
and at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from genpath.io.images import expand_inputs, plan_outputs, read_image, write_image
from genpath.utils.atomic import PeriodicJsonWriter
from genpath.utils.logging import get_logger
from normalization.base import StainNormalizer

logger = get_logger(__name__)
TILE_FORMATS = ("png", "jpg", "tif", "same")


def normalize_tiles(
    inputs: Iterable[str | Path],
    out: str | Path,
    normalizer: StainNormalizer,
    output_format: str = "png",
    batch_size: int = 32,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Normalize image files into ``out``; returns one record per file (never raises for one bad file).

    Args:
        inputs: image files, folders (recursive) or glob patterns.
        out: output folder (created); outputs mirror the inputs' relative names.
        normalizer: a fitted normalizer.
        output_format: ``png`` (lossless), ``jpg``, ``tif`` or ``same``.
        batch_size: files read and normalized together (same-size tiles share one call).
        device: where the normalizer runs.
        progress: called with the number of files just finished.

    Returns:
        Records ``{input, output, status, [error]}`` with ``status`` ``normalized``,
        ``passed_through`` (no usable tissue: pixels kept) or ``failed``.

    Raises:
        FileNotFoundError: an input matches nothing.
        ValueError: ``output_format`` or ``batch_size`` is invalid.
    """
    if output_format not in TILE_FORMATS:
        raise ValueError(f"output_format: expected one of {TILE_FORMATS}, got {output_format!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    out = Path(out)
    plan = plan_outputs(expand_inputs(inputs), out, output_format)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    manifest = PeriodicJsonWriter(out / "manifest.json")
    advance = progress or (lambda n: None)

    def failed(path: Path, error: Exception | str) -> dict[str, Any]:
        message = error if isinstance(error, str) else f"{error}"
        return {"input": str(path), "status": "failed", "error": message}

    for start in range(0, len(plan), batch_size):
        groups: dict[tuple[int, ...], list[tuple[Path, Path, torch.Tensor]]] = {}
        for path, destination, refused in plan[start : start + batch_size]:
            try:
                if refused:
                    raise ValueError(refused)
                image = read_image(path)
                groups.setdefault(tuple(image.shape), []).append((path, destination, image))
            except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch
                records.append(failed(path, error))
                advance(1)
        for items in groups.values():
            records.extend(_normalize_group(items, normalizer, device))
            advance(len(items))
        manifest.update(records)
    manifest.flush(records)
    logger.info("normalized %d files into %s", len(records), out)
    return records


def _normalize_group(
    items: list[tuple[Path, Path, torch.Tensor]], normalizer: StainNormalizer, device: str
) -> list[dict[str, Any]]:
    """Normalize same-size tiles in one call and write them; failures become records."""
    batch = torch.stack([image for _, _, image in items]).to(device)
    try:
        result, valid = normalizer(batch, return_valid=True)
    except Exception as error:  # noqa: BLE001 - report and go on with the next group
        return [{"input": str(p), "status": "failed", "error": str(error)} for p, _, _ in items]
    records = []
    for (path, destination, _), image, ok in zip(items, result.cpu(), valid.tolist(), strict=True):
        try:
            write_image(image, destination)
            records.append({"input": str(path), "output": str(destination),
                            "status": "normalized" if ok else "passed_through"})
        except Exception as error:  # noqa: BLE001
            records.append({"input": str(path), "status": "failed", "error": str(error)})
    return records
