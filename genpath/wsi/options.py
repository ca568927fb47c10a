"""Settings and results of the slide engine."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

SlideFormat = Literal["tiff", "ome-zarr"]


@dataclass
class SlideOptions:
    """How a slide is tiled, processed and written.

    Attributes:
        tile_size: output tile (and TIFF tile / Zarr chunk) size in pixels.
        overlap: window margin in pixels on each side; 0 for per-pixel maps (seam-free by
            construction), > 0 to feather-blend tile-dependent (neural) tile functions.
        level: slide level to process (0 = full resolution).
        batch_size: windows per tile-function call.
        output_format: ``"tiff"`` (pyramidal BigTIFF) or ``"ome-zarr"``.
        compression: TIFF tile compression, ``"jpeg"`` or ``"zlib"``.
        quality: JPEG quality.
        aperio: write an Aperio-style TIFF description (QuPath shows the magnification).
        min_tissue: a window with less tissue than this share (per the tissue mask) is background
            and keeps its pixels; 0 sends every window through the tile function.
        tissue_mpp: resolution (µm/px) of tissue detection; ``tissue_downsample`` when mpp is unknown.
        tissue_downsample: downsample of tissue detection for slides without mpp.
        tissue_max_size: longest side of the tissue mask (caps memory on huge slides).
        max_batch_pixels: windows per tile-function call are also capped so that a batch holds
            at most this many pixels (bounded memory whatever the tile size).
        source: ``"slide"`` lets a processor with ``fit_slide`` fit once per slide; ``"tile"``
            calls the processor on each window as it is (it may fit per window).
        fit_on: where the slide's statistics come from: ``"windows"`` (tissue windows sampled at
            the working resolution, default) or ``"thumbnail"`` (tissue pixels of the
            low-resolution tissue-detection image: cheaper, but downsampling averages nuclei
            with stroma, which lowers the stain percentiles).
        fit_windows: tissue windows sampled to fit the slide's statistics.
        fit_window_size: their size in pixels.
        feather: blending ramp, ``"cosine"`` or ``"linear"``.
        qc: write QC PNGs (before/after thumbnails, tissue mask).
        qc_size: longest side of QC thumbnails.
        fast_path: let a tile function that is one fixed per-pixel map with a libvips form
            (classical normalizers after the per-slide fit) run read → map → pyramid in libvips
            (:mod:`genpath.wsi.vips_slide`) where it applies; False always uses the tile engine.
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
    fast_path: bool = True

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
        for name in ("tissue_mpp", "tissue_downsample", "max_batch_pixels", "tissue_max_size", "fit_windows",
                     "fit_window_size", "qc_size"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality: expected a JPEG quality in 1..100, got {self.quality}")
        if self.compression not in ("jpeg", "zlib"):
            raise ValueError(f"compression: expected 'jpeg' or 'zlib', got {self.compression!r}")
        if self.feather not in ("cosine", "linear"):
            raise ValueError(f"feather: expected 'cosine' or 'linear', got {self.feather!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideResult:
    """What :func:`genpath.wsi.engine.process_slide` did."""

    output: str
    dimensions: tuple[int, int]
    mpp: float | None
    tiles: int
    tissue_tiles: int
    seconds: float
    qc: list[str]
