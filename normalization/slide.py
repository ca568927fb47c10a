"""Normalize a whole slide: detect tissue, fit per slide, stream tiles through, write a pyramid.

1. Open the slide (any :func:`~genpath.io.slide.open_slide` backend).
2. Detect tissue on a low-resolution thumbnail (:func:`~genpath.tissue.detect_tissue`).
3. Classical methods: estimate the slide's source stain statistics *once*, from tissue windows
   sampled over the whole slide at the working resolution, so every tile gets the same map
   (no seams by construction). Percentiles are taken at the working resolution rather than on
   the thumbnail because downsampling averages nuclei with stroma and shrinks them.
4. Stream windows through the tile engine (:mod:`genpath.tiling`); background windows keep
   their pixels and skip the normalizer; overlapping windows are feather-blended.
5. Write a pyramidal BigTIFF or OME-Zarr (:mod:`genpath.io.slide_writer`), keeping the level's
   size and mpp, plus QC images (before/after thumbnails, tissue mask).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from genpath.io.slide import SlideReader, open_slide
from genpath.io.slide_writer import OmeZarrWriter, TiffPyramidWriter
from genpath.tiling import TileGrid, iter_strips
from genpath.tissue import detect_tissue, tile_tissue_fraction

SlideFormat = Literal["tiff", "ome-zarr"]


@dataclass
class SlideOptions:
    """How a slide is tiled, normalized and written.

    Attributes:
        tile_size: output tile (and TIFF tile / Zarr chunk) size in pixels.
        overlap: window margin in pixels on each side; 0 for classical methods (seam-free by
            construction), > 0 to feather-blend tile-dependent (neural) methods.
        level: slide level to normalize (0 = full resolution).
        batch_size: windows per normalizer call.
        output_format: ``"tiff"`` (pyramidal BigTIFF) or ``"ome-zarr"``.
        compression: TIFF tile compression, ``"jpeg"`` or ``"zlib"``.
        quality: JPEG quality.
        aperio: write an Aperio-style TIFF description (QuPath shows the magnification).
        min_tissue: a window with less tissue than this share (per the tissue mask) is background
            and keeps its pixels; 0 sends every window through the normalizer.
        tissue_mpp: resolution (µm/px) of tissue detection; ``tissue_downsample`` when mpp is unknown.
        tissue_downsample: downsample of tissue detection for slides without mpp.
        tissue_max_size: longest side of the tissue mask (caps memory on huge slides).
        max_batch_pixels: windows per normalizer call are also capped so that a batch holds
            at most this many pixels (bounded memory whatever the tile size).
        source: ``"slide"`` fits source statistics once per slide; ``"tile"`` per window.
        fit_on: where the slide's statistics come from: ``"windows"`` (tissue windows sampled at
            the working resolution, default) or ``"thumbnail"`` (tissue pixels of the
            low-resolution tissue-detection image: cheaper, but downsampling averages nuclei
            with stroma, which lowers the stain percentiles).
        fit_windows: tissue windows sampled to fit the slide's statistics.
        fit_window_size: their size in pixels.
        feather: blending ramp, ``"cosine"`` or ``"linear"``.
        qc: write QC PNGs (before/after thumbnails, tissue mask).
        qc_size: longest side of QC thumbnails.
    """

    tile_size: int = 512
    overlap: int = 0
    level: int = 0
    batch_size: int = 16
    output_format: SlideFormat = "tiff"
    compression: str = "jpeg"
    quality: int = 90
    aperio: bool = True
    min_tissue: float = 0.01
    tissue_mpp: float = 8.0
    tissue_downsample: float = 16.0
    tissue_max_size: int = 2048
    max_batch_pixels: int = 2**21
    source: Literal["slide", "tile"] = "slide"
    fit_on: Literal["windows", "thumbnail"] = "windows"
    fit_windows: int = 32
    fit_window_size: int = 256
    feather: str = "cosine"
    qc: bool = True
    qc_size: int = 1024

    def __post_init__(self) -> None:
        if self.output_format not in ("tiff", "ome-zarr"):
            raise ValueError(f"output_format: expected 'tiff' or 'ome-zarr', got {self.output_format!r}")
        if self.tile_size < 64 or self.tile_size % 16:
            raise ValueError(f"tile_size: expected a multiple of 16, at least 64, got {self.tile_size}")
        if not 0 <= self.overlap <= self.tile_size // 2:
            raise ValueError(f"overlap: expected 0..tile_size/2 ({self.tile_size // 2}), got {self.overlap}")
        if self.fit_on not in ("windows", "thumbnail"):
            raise ValueError(f"fit_on: expected 'windows' or 'thumbnail', got {self.fit_on!r}")
        if self.source not in ("slide", "tile"):
            raise ValueError(f"source: expected 'slide' or 'tile', got {self.source!r}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue: expected a share in [0, 1], got {self.min_tissue}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideResult:
    """What :func:`normalize_slide` did."""

    output: str
    dimensions: tuple[int, int]
    mpp: float | None
    tiles: int
    tissue_tiles: int
    seconds: float
    qc: list[str]


def tissue_downsample(reader: SlideReader, options: SlideOptions) -> float:
    """Downsample (relative to level 0) at which tissue is detected."""
    if reader.mpp:
        factor = options.tissue_mpp / reader.mpp[0]
    else:
        factor = options.tissue_downsample
    longest = max(reader.dimensions)
    factor = max(factor, longest / options.tissue_max_size)  # bounded mask memory on huge slides
    return float(max(1.0, min(factor, longest / 64)))


def _to_tensor(windows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(windows)).permute(0, 3, 1, 2)


def slide_source_statistics(
    reader: SlideReader,
    normalizer: nn.Module,
    mask: np.ndarray,
    mask_downsample: float,
    level: int,
    options: SlideOptions,
) -> dict[str, torch.Tensor] | None:
    """Estimate a slide's source statistics from tissue windows spread over the whole slide.

    Windows are the ``fit_windows`` most tissue-rich cells of a coarse grid, taken evenly
    across the slide (deterministic). Returns None when the slide has no usable tissue.
    """
    size = options.fit_window_size
    factor = reader.level_downsamples[level]
    span = size * factor  # level-0 pixels per window
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
    try:
        return normalizer.estimate_source(_to_tensor(np.stack(windows)))
    except ValueError:
        return None


def normalize_slide(
    source: str | Path | SlideReader,
    output: str | Path,
    normalizer: nn.Module,
    options: SlideOptions | None = None,
    mpp: float | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
    resume_key: str = "",
) -> SlideResult:
    """Normalize one slide into a pyramidal TIFF or OME-Zarr at ``output``.

    Args:
        source: slide path or an open reader.
        output: output path (``.tiff`` file or ``.ome.zarr`` folder); written under a temporary
            name (TIFF) or with a resume log (Zarr), so a partial output is never taken as done.
        normalizer: a fitted normalizer (``forward(images, source=...)``), or any module mapping
            uint8 ``(B,3,h,w)`` to images.
        options: tiling and output settings.
        mpp: microns per pixel override for slides without metadata.
        resume: OME-Zarr only: keep tiles an interrupted run already wrote.
        resume_key: identifies the settings; tiles written under another key are not reused.
        progress: called as ``progress(done_windows, total_windows)``.
        device: where the normalizer runs.

    Returns:
        A :class:`SlideResult`.
    """
    options = options or SlideOptions()
    start = time.perf_counter()
    reader = source if isinstance(source, SlideReader) else open_slide(source, mpp=mpp)
    try:
        return _normalize_open_slide(
            reader, Path(output), normalizer, options, resume, progress, device, start, resume_key
        )
    finally:
        if not isinstance(source, SlideReader):
            reader.close()


def _normalize_open_slide(
    reader: SlideReader,
    output: Path,
    normalizer: nn.Module,
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

    # 2. per-slide statistics
    stats = None
    if (options.source == "slide" and hasattr(normalizer, "estimate_source")
            and getattr(normalizer, "uses_source_statistics", True)):
        if options.fit_on == "thumbnail" and mask.any():
            try:
                stats = normalizer.estimate_source(_to_tensor(thumbnail[None])[0], torch.from_numpy(mask))
            except ValueError:
                stats = None
        else:
            stats = slide_source_statistics(reader, normalizer, mask, mask_ds, level, options)

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
        batch = _to_tensor(windows).to(device)
        result = normalizer(batch, source=stats) if stats is not None else normalizer(batch)
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
    if options.output_format == "tiff":
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

    qc_files: list[str] = []
    if options.qc:
        qc_files = write_qc(reader, output, thumbnail, mask, options)
    return SlideResult(str(output), (width, height), out_mpp, total, counts["tissue"],
                       time.perf_counter() - start, qc_files)


def _read_output_thumbnail(output: Path, shape: tuple[int, int], level_size: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    if output.suffix == ".zarr" or output.is_dir():
        import zarr

        group = zarr.open_group(str(output), mode="r")
        keys = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
        coarsest = next((k for k in keys if max(group[k].shape[1:]) <= 2 * max(shape)), keys[-1])
        image = np.moveaxis(np.asarray(group[coarsest]), 0, -1)
    else:
        with open_slide(output) as slide:
            image = slide.thumbnail(max(1.0, level_size[0] / shape[1]))
    return np.clip(resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).round(), 0, 255).astype(
        np.uint8
    )


def write_qc(
    reader: SlideReader, output: Path, thumbnail: np.ndarray, mask: np.ndarray, options: SlideOptions
) -> list[str]:
    """Write ``<output>.qc/`` with ``before_after.png`` (side by side) and ``tissue_mask.png``."""
    from PIL import Image
    from skimage.transform import resize

    from genpath.io.images import write_image

    scale = min(1.0, options.qc_size / max(thumbnail.shape[:2]))
    shape = (max(1, round(thumbnail.shape[0] * scale)), max(1, round(thumbnail.shape[1] * scale)))
    before = np.clip(resize(thumbnail, shape, order=1, anti_aliasing=True, preserve_range=True).round(), 0, 255)
    before = before.astype(np.uint8)
    after = _read_output_thumbnail(output, shape, reader.level_dimensions[options.level])
    gap = np.full((shape[0], 8, 3), 255, np.uint8)
    pair = np.concatenate([before, gap, after], axis=1)
    folder = output.with_name(output.name + ".qc")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "before_after.png", folder / "tissue_mask.png"]
    write_image(torch.from_numpy(pair).permute(2, 0, 1), paths[0])
    mask_image = Image.fromarray((mask * 255).astype(np.uint8))
    mask_rgb = np.asarray(mask_image.convert("RGB"))
    write_image(torch.from_numpy(mask_rgb.copy()).permute(2, 0, 1), paths[1])
    return [str(p) for p in paths]
