"""One slide through any tile function: tissue, optional per-slide fit, streamed windows, a pyramid.

1. Open the slide (any :func:`~genpath.io.slide.open_slide` backend).
2. Detect tissue on a low-resolution thumbnail (:func:`~genpath.tissue.detect_tissue`).
3. A :class:`~genpath.wsi.hooks.SlideFitter` is fitted *once* per slide, on tissue windows
   sampled over the whole slide at the working resolution (or on the thumbnail), so every
   tile gets the same map (no seams by construction for per-pixel maps).
4. Stream windows through the tile engine (:mod:`genpath.tiling`); background windows keep
   their pixels and skip the tile function; overlapping windows are feather-blended.
5. Write a pyramidal BigTIFF or OME-Zarr (:mod:`genpath.io.slide_writer`), keeping the level's
   size and mpp, plus QC images (:mod:`genpath.wsi.qc`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genpath.io.slide import SlideReader, open_slide
from genpath.io.slide_writer import OmeZarrWriter, TiffPyramidWriter
from genpath.tiling import TileGrid, iter_strips
from genpath.tissue import detect_tissue, tile_tissue_fraction
from genpath.utils.logging import get_logger
from genpath.wsi.hooks import TileFunction, tile_function_for_slide
from genpath.wsi.options import SlideOptions, SlideResult
from genpath.wsi.qc import write_qc
from genpath.wsi.vips_slide import vips_source, write_mapped_slide

logger = get_logger(__name__)


def tissue_downsample(reader: SlideReader, options: SlideOptions) -> float:
    """Downsample (relative to level 0) at which tissue is detected."""
    if reader.mpp:
        factor = options.tissue_mpp / reader.mpp[0]
    else:
        factor = options.tissue_downsample
    longest = max(reader.dimensions)
    factor = max(factor, longest / options.tissue_max_size)  # bounded mask memory on huge slides
    return float(max(1.0, min(factor, longest / 64)))


def windows_to_tensor(windows: np.ndarray) -> torch.Tensor:
    """uint8 ``(B,h,w,3)`` numpy windows to a uint8 ``(B,3,h,w)`` tensor (no copy when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(windows)).permute(0, 3, 1, 2)


def sample_tissue_windows(
    reader: SlideReader, mask: np.ndarray, mask_downsample: float, level: int, options: SlideOptions
) -> torch.Tensor | None:
    """Read up to ``options.fit_windows`` tissue windows spread evenly over the whole slide.

    Windows are cells of a coarse grid (``fit_window_size`` at ``level``) that are at least half
    tissue, taken evenly across the slide (deterministic).

    Returns:
        uint8 ``(B,3,s,s)`` windows, or None when the slide has no such cell.
    """
    size = options.fit_window_size
    span = size * reader.level_downsamples[level]  # level-0 pixels per window
    w0, h0 = reader.dimensions
    candidates = []
    for y in np.arange(0, max(h0 - span, 0) + 1, span):
        for x in np.arange(0, max(w0 - span, 0) + 1, span):
            fraction = tile_tissue_fraction(mask, mask_downsample, (int(x), int(y)), (int(span), int(span)))
            if fraction >= 0.5:
                candidates.append((int(x), int(y)))
    if not candidates:
        return None
    picks = np.unique(np.linspace(0, len(candidates) - 1, min(options.fit_windows, len(candidates))).round())
    windows = [reader.read_region(candidates[int(i)], level, (size, size)) for i in picks]
    return windows_to_tensor(np.stack(windows))


def process_slide(
    source: str | Path | SlideReader,
    output: str | Path,
    processor: TileFunction,
    options: SlideOptions | None = None,
    mpp: float | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
    resume_key: str = "",
) -> SlideResult:
    """Stream one slide through ``processor`` into a pyramidal TIFF or OME-Zarr at ``output``.

    Args:
        source: slide path or an open reader.
        output: output path (``.tiff`` file or ``.ome.zarr`` folder); written under a temporary
            name (TIFF) or with a resume log (Zarr), so a partial output is never taken as done.
        processor: a tile function (uint8 ``(B,3,h,w)`` to images), optionally a
            :class:`~genpath.wsi.hooks.SlideFitter` fitted once on this slide.
        options: tiling and output settings.
        mpp: microns per pixel override for slides without metadata.
        resume: OME-Zarr only: keep tiles an interrupted run already wrote.
        progress: called as ``progress(done_windows, total_windows)``.
        device: where the tile function runs (windows are moved there).
        resume_key: identifies the settings; tiles written under another key are not reused.

    Returns:
        A :class:`~genpath.wsi.options.SlideResult`.
    """
    options = options or SlideOptions()
    start = time.perf_counter()
    reader = source if isinstance(source, SlideReader) else open_slide(source, mpp=mpp)
    try:
        return _process_open_slide(reader, Path(output), processor, options, resume, progress, device, start,
                                   resume_key)
    finally:
        if not isinstance(source, SlideReader):
            reader.close()


def _fit_images(
    reader: SlideReader, thumbnail: np.ndarray, mask: np.ndarray, mask_ds: float, options: SlideOptions
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return what a slide fitter is fitted on: tissue windows, or the thumbnail with its mask."""
    if options.source != "slide":
        return None, None
    if options.fit_on == "thumbnail":
        if not mask.any():
            return None, None
        return windows_to_tensor(thumbnail[None])[0], torch.from_numpy(mask)
    return sample_tissue_windows(reader, mask, mask_ds, options.level, options), None


def _foreground_grid(grid: TileGrid, is_foreground: Callable[[int, int], bool]) -> np.ndarray:
    """``(rows, cols)`` bool: which windows go through the tile function."""
    return np.array([[is_foreground(r, c) for c in range(grid.cols)] for r in range(grid.rows)], dtype=bool)


def _write_with_vips(
    reader: SlideReader,
    output: Path,
    tile_function: TileFunction,
    options: SlideOptions,
    grid: TileGrid,
    is_foreground: Callable[[int, int], bool],
    mpp: float | None,
    progress: Callable[[int, int], None] | None,
) -> int | None:
    """Write the slide through libvips when the tile function is a fixed per-pixel map with a libvips form.

    Returns the number of tissue windows, or None (nothing written) when the fast path does not
    apply or libvips fails: the caller then runs the tile engine, so failures and their messages
    stay those of that path.
    """
    vips_map = getattr(tile_function, "vips_map", None)
    if not callable(vips_map):
        return None
    source = vips_source(reader, options)
    mapped = None if source is None else vips_map(source)
    if mapped is None:
        return None
    import pyvips

    total = grid.rows * grid.cols
    foreground = _foreground_grid(grid, is_foreground)

    def report(share: float) -> None:
        if progress:
            progress(round(share * total), total)

    try:
        write_mapped_slide(source, mapped, foreground, output, options, mpp, report)
    except pyvips.Error as error:
        logger.warning("%s: libvips failed (%s); using the tile engine", reader.path, str(error).splitlines()[0])
        return None
    logger.info("%s: written by libvips (fixed per-pixel map)", reader.path)
    return int(foreground.sum())


def _process_open_slide(
    reader: SlideReader,
    output: Path,
    processor: TileFunction,
    options: SlideOptions,
    resume: bool,
    progress: Callable[[int, int], None] | None,
    device: str | torch.device,
    start: float,
    resume_key: str,
) -> SlideResult:
    level = options.level
    if not 0 <= level < reader.level_count:
        raise ValueError(f"level: expected 0..{reader.level_count - 1} for {reader.path}, got {level}")
    width, height = reader.level_dimensions[level]
    factor = reader.level_downsamples[level]
    out_mpp = reader.mpp[0] * factor if reader.mpp else None

    # 1. tissue
    mask_ds = tissue_downsample(reader, options)
    thumbnail = reader.thumbnail(mask_ds)
    mask = detect_tissue(thumbnail)
    mask_ds = reader.dimensions[0] / mask.shape[1]

    # 2. per-slide fit (only for processors that want one)
    tile_function = processor
    if hasattr(processor, "fit_slide") and getattr(processor, "fits_slides", True):
        images, image_mask = _fit_images(reader, thumbnail, mask, mask_ds, options)
        tile_function = tile_function_for_slide(processor, images, image_mask)

    # 3. stream
    grid = TileGrid(width, height, options.tile_size, options.overlap)
    batch_size = max(1, min(options.batch_size, options.max_batch_pixels // grid.window_size**2))

    def read(x: int, y: int, w: int, h: int) -> np.ndarray:
        return reader.read_region((round(x * factor), round(y * factor)), level, (w, h))

    def is_foreground(row: int, col: int) -> bool:
        if options.min_tissue <= 0:
            return True
        x, y, w, h = grid.window(row, col)
        box = (round(max(x, 0) * factor), round(max(y, 0) * factor))
        return tile_tissue_fraction(mask, mask_ds, box, (round(w * factor), round(h * factor))) >= options.min_tissue

    @torch.inference_mode()
    def process(windows: np.ndarray) -> np.ndarray:
        result = tile_function(windows_to_tensor(windows).to(device))
        if result.dtype != torch.uint8:
            result = (result.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return result.permute(0, 2, 3, 1).cpu().numpy()

    counts = {"done": 0, "tissue": 0}
    total = grid.rows * grid.cols

    def on_window(row: int, col: int, processed: bool) -> None:
        counts["done"] += 1
        counts["tissue"] += int(processed)
        if progress:
            progress(counts["done"], total)

    output.parent.mkdir(parents=True, exist_ok=True)
    logger.info("%s: %dx%d at level %d, %d windows", reader.path, width, height, level, total)
    tissue_tiles = _write_with_vips(reader, output, tile_function, options, grid, is_foreground, out_mpp, progress)
    if tissue_tiles is not None:
        counts["done"], counts["tissue"] = total, tissue_tiles
    elif options.output_format == "tiff":
        writer = TiffPyramidWriter(output, width, height, options.tile_size, out_mpp, options.compression,
                                   options.quality, options.aperio)
        strips = iter_strips(read, grid, process, is_foreground, batch_size=batch_size,
                             feather=options.feather, on_window=on_window)
        writer.write(strip for _, strip in strips)
    else:
        zwriter = OmeZarrWriter(output, width, height, options.tile_size, out_mpp, name=reader.path.name)
        done = zwriter.open(resume=resume, key=resume_key)
        for row, strip in iter_strips(read, grid, process, is_foreground, skip=done, batch_size=batch_size,
                                      feather=options.feather, on_window=on_window):
            zwriter.write_strip(row, strip, skip=done)
        zwriter.finish()

    qc_files = write_qc(reader, output, thumbnail, mask, options) if options.qc else []
    return SlideResult(str(output), (width, height), out_mpp, total, counts["tissue"],
                       time.perf_counter() - start, qc_files)
