"""Synthetic whole-slide images built from real tissue patches (tests and benchmarks).

Tissue blobs (a thresholded smooth random field) are filled with real H&E patches on a white,
slightly noisy glass background, streamed strip by strip so slides of any size fit in memory.
Formats: ``"tiff"`` (generic pyramidal tiled TIFF), ``"svs"`` (the same with an Aperio
description), ``"ome-tiff"`` (OME-TIFF with a SubIFD pyramid, small slides only) and ``"flat"``
(an untiled single-level TIFF, small slides only).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

BACKGROUND = np.array([242, 241, 239], np.uint8)


def tissue_field(width: int, height: int, cell: int, tissue_share: float, seed: int) -> np.ndarray:
    """Boolean tissue layout at ``cell`` pixels per element (smooth blobs covering ~``tissue_share``)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (max(2, -(-height // cell)), max(2, -(-width // cell)))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(1.0, min(shape) / 8))
    threshold = np.quantile(noise, 1.0 - tissue_share)
    return noise > threshold


def synthetic_strips(
    width: int, height: int, patches: np.ndarray, tile: int = 512, tissue_share: float = 0.4, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield uint8 ``(h, width, 3)`` strips of a synthetic slide, top to bottom.

    Args:
        width: slide width.
        height: slide height.
        patches: uint8 ``(N, p, p, 3)`` real tissue patches that fill the blobs.
        tile: strip height.
        tissue_share: approximate share of the slide covered by tissue.
        seed: layout and patch choice.
    """
    cell = 32
    layout = tissue_field(width, height, cell, tissue_share, seed)
    rng = np.random.default_rng(seed + 1)
    n, p = patches.shape[0], patches.shape[1]
    for y in range(0, height, tile):
        h = min(tile, height - y)
        strip = np.broadcast_to(BACKGROUND, (h, width, 3)).copy()
        noise = rng.integers(-3, 4, size=(h, width, 1), dtype=np.int16)
        strip = np.clip(strip.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        rows = np.arange(y, y + h) // cell
        for x in range(0, width, p):
            cols = np.arange(x, min(x + p, width)) // cell
            block = layout[rows][:, cols]
            if not block.any():
                continue
            patch = patches[rng.integers(n)]
            patch = np.rot90(patch, k=int(rng.integers(4)))
            reps = -(-h // p)
            column = np.concatenate([patch] * reps, axis=0)[:h, : cols.shape[0]]
            region = strip[:, x : x + cols.shape[0]]
            region[block] = column[block]
        yield strip


def write_synthetic_slide(
    path: str | Path,
    width: int,
    height: int,
    patches: np.ndarray,
    kind: str = "tiff",
    tile: int = 256,
    mpp: float | None = 0.5,
    tissue_share: float = 0.4,
    seed: int = 0,
    compression: str = "jpeg",
) -> Path:
    """Write a synthetic slide of ``kind`` (see module doc) and return its path."""
    import tifffile

    from genpath.io.slide_writer import TiffPyramidWriter, downsample_2x

    path = Path(path)
    strips = synthetic_strips(width, height, patches, tile, tissue_share, seed)
    if kind in ("tiff", "svs"):
        writer = TiffPyramidWriter(path, width, height, tile, mpp, compression=compression, aperio=kind == "svs")
        return writer.write(strips)
    image = np.concatenate(list(strips), axis=0)
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    if kind == "flat":
        tifffile.imwrite(path, image, photometric="rgb", metadata=None, **resolution)
        return path
    if kind == "ome-tiff":
        levels = [image]
        while max(levels[-1].shape[:2]) > tile:
            levels.append(downsample_2x(levels[-1]))
        metadata = {"axes": "YXS", **({"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {})}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            tw.write(image, subifds=len(levels) - 1, tile=(tile, tile), photometric="rgb", compression="zlib",
                     metadata=metadata, **resolution)
            for level in levels[1:]:
                tw.write(level, subfiletype=1, tile=(tile, tile), photometric="rgb", compression="zlib")
        return path
    raise ValueError(f"kind: expected 'tiff', 'svs', 'ome-tiff' or 'flat', got {kind!r}")
