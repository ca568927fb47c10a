"""Whole-slide readers: one interface over OpenSlide, tifffile and plain images.

:func:`open_slide` picks the backend: OpenSlide (SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF,
DICOM, ...) when it recognises the file, tifffile for what OpenSlide does not read (OME-TIFF
with SubIFD pyramids, untiled TIFF), and Pillow for plain PNG/JPEG images. Every reader returns
uint8 RGB regions ``(H,W,3)`` with alpha composited onto white, so unscanned areas are white
rather than black.

Coordinates follow OpenSlide: ``location`` is the top-left corner in level-0 pixels, ``size``
is ``(width, height)`` in pixels of the requested level.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Self

import numpy as np

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm", ".qptiff",
)
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite a non-premultiplied RGBA uint8 array ``(H,W,4)`` onto white; returns ``(H,W,3)`` uint8."""
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class SlideReader(ABC):
    """A multi-resolution RGB image.

    Attributes:
        path: the slide file.
        backend: ``"openslide"``, ``"tifffile"`` or ``"pillow"``.
        level_dimensions: ``(width, height)`` of every level, level 0 first.
        level_downsamples: downsample factor of every level relative to level 0.
        mpp: microns per pixel ``(x, y)`` at level 0, or None when unknown.
        vendor: the format's vendor string when known.
    """

    backend: str = ""

    def __init__(self, path: str | Path, mpp: float | tuple[float, float] | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = _as_mpp(mpp)
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self.vendor: str | None = None

    # ------------------------------------------------------------------ interface
    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region lying inside the level; returns uint8 ``(h,w,3)``."""

    def _metadata_mpp(self) -> tuple[float, float] | None:
        return None

    def close(self) -> None:  # noqa: B027 - optional hook: readers without handles need nothing
        """Release the file handle."""

    # ------------------------------------------------------------------ derived
    @property
    def mpp(self) -> tuple[float, float] | None:
        return self._mpp_override or self._metadata_mpp()

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the highest-resolution level whose downsample is at most ``downsample`` (level 0 if none)."""
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= downsample * (1 + 1e-6):
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size=(w,h)`` pixels of ``level`` at level-0 ``location=(x,y)``.

        Areas outside the slide are white. Returns uint8 ``(h,w,3)``.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level: expected 0..{self.level_count - 1}, got {level}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size: expected positive (width, height), got {size}")
        factor = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        x0, y0 = int(round(location[0] / factor)), int(round(location[1] / factor))
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        if cx0 == x0 and cy0 == y0 and cx1 == x0 + w and cy1 == y0 + h:
            return self._read((int(location[0]), int(location[1])), level, (w, h))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            inner = self._read((int(round(cx0 * factor)), int(round(cy0 * factor))), level, (cx1 - cx0, cy1 - cy0))
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = inner
        return out

    def read_level(self, level: int, tile: int = 4096) -> np.ndarray:
        """Read a whole level (meant for low-resolution levels), in tiles. Returns uint8 ``(H,W,3)``."""
        w, h = self.level_dimensions[level]
        out = np.empty((h, w, 3), dtype=np.uint8)
        factor = self.level_downsamples[level]
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                tw, th = min(tile, w - x), min(tile, h - y)
                out[y : y + th, x : x + tw] = self.read_region((round(x * factor), round(y * factor)), level, (tw, th))
        return out

    def thumbnail(self, downsample: float, tile: int = 1024) -> np.ndarray:
        """Read the slide at ``downsample`` (relative to level 0) from the nearest finer level, area-averaged.

        Memory is bounded by the output size plus one tile, whatever the slide size.
        """
        from skimage.transform import resize

        level = self.best_level_for_downsample(downsample)
        factor = downsample / self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        ow, oh = max(1, round(lw / factor)), max(1, round(lh / factor))
        if abs(factor - 1.0) < 1e-6:
            return self.read_level(level)
        out = np.empty((oh, ow, 3), dtype=np.uint8)
        step = max(1, int(tile // factor)) or 1  # output pixels per tile
        for oy in range(0, oh, step):
            for ox in range(0, ow, step):
                tw, th = min(step, ow - ox), min(step, oh - oy)
                sx, sy = round(ox * factor), round(oy * factor)
                sw, sh = max(1, round((ox + tw) * factor) - sx), max(1, round((oy + th) * factor) - sy)
                ds = self.level_downsamples[level]
                region = self.read_region((round(sx * ds), round(sy * ds)), level, (sw, sh))
                small = resize(region, (th, tw), order=1, anti_aliasing=True, preserve_range=True)
                out[oy : oy + th, ox : ox + tw] = np.clip(np.round(small), 0, 255).astype(np.uint8)
        return out

    def properties(self) -> dict[str, Any]:
        """Summarize as JSON-friendly data: backend, vendor, dimensions, levels, downsamples, mpp."""
        return {
            "path": str(self.path), "backend": self.backend, "vendor": self.vendor,
            "dimensions": list(self.dimensions), "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples, "mpp": list(self.mpp) if self.mpp else None,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, levels={self.level_dimensions}, mpp={self.mpp})"


def _as_mpp(mpp: float | tuple[float, float] | None) -> tuple[float, float] | None:
    if mpp is None:
        return None
    pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))  # type: ignore[index]
    if not all(np.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"mpp: expected positive microns per pixel, got {mpp}")
    return pair


class OpenSlideReader(SlideReader):
    """Slides that OpenSlide reads (SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, DICOM, ...)."""

    backend = "openslide"

    def __init__(self, path: str | Path, mpp: float | tuple[float, float] | None = None) -> None:
        import openslide

        super().__init__(path, mpp)
        self._slide = openslide.OpenSlide(str(path))
        self.level_dimensions = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        self.vendor = self._slide.properties.get("openslide.vendor")

    def _metadata_mpp(self) -> tuple[float, float] | None:
        props = self._slide.properties
        try:
            return _as_mpp((float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])))
        except (KeyError, ValueError):
            return None

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return composite_on_white(np.asarray(self._slide.read_region(location, level, size)))

    def close(self) -> None:
        self._slide.close()


class TiffFileReader(SlideReader):
    """TIFF read with tifffile: OME-TIFF (SubIFD pyramids), untiled and other TIFFs OpenSlide rejects."""

    backend = "tifffile"

    def __init__(self, path: str | Path, mpp: float | tuple[float, float] | None = None) -> None:
        import tifffile
        import zarr

        super().__init__(path, mpp)
        self._tif = tifffile.TiffFile(str(path))
        series = self._tif.series[0]
        axes = series.axes
        if not ("Y" in axes and "X" in axes):
            raise ValueError(f"path: expected a 2-D image series, got axes {axes!r} in {path}")
        self._axes = axes
        self._levels = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(series.levels))]
        yi, xi = axes.index("Y"), axes.index("X")
        self.level_dimensions = [(int(lv.shape[xi]), int(lv.shape[yi])) for lv in series.levels]
        w0 = self.level_dimensions[0][0]
        self.level_downsamples = [w0 / d[0] for d in self.level_dimensions]
        self.vendor = "ome" if self._tif.is_ome else "tiff"

    def _metadata_mpp(self) -> tuple[float, float] | None:
        if self._tif.is_ome and self._tif.ome_metadata:
            try:
                pixels = ET.fromstring(self._tif.ome_metadata).find(".//{*}Pixels")
                if pixels is not None and "PhysicalSizeX" in pixels.attrib:
                    unit = pixels.attrib.get("PhysicalSizeXUnit", "µm")
                    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit, 1.0)
                    x = float(pixels.attrib["PhysicalSizeX"]) * scale
                    y = float(pixels.attrib.get("PhysicalSizeY", pixels.attrib["PhysicalSizeX"])) * scale
                    return _as_mpp((x, y))
            except (ET.ParseError, ValueError):
                pass
        page = self._tif.pages[0]
        description = page.description or ""
        match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
        if match:
            return _as_mpp(float(match.group(1)))
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            unit = int(tags["ResolutionUnit"].value)
            per = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre → µm
            xres, yres = tags["XResolution"].value, tags.get("YResolution", tags["XResolution"]).value
            if per and xres[0] and yres[0]:
                return _as_mpp((per * xres[1] / xres[0], per * yres[1] / yres[0]))
        return None

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return _read_array_region(self._levels[level], self._axes, location, self.level_downsamples[level], size)

    def close(self) -> None:
        self._tif.close()


class PillowImageReader(SlideReader):
    """A plain PNG/JPEG image as a single-level slide (read fully: meant for small images)."""

    backend = "pillow"

    def __init__(self, path: str | Path, mpp: float | tuple[float, float] | None = None) -> None:
        from genpath.io.images import read_image

        super().__init__(path, mpp)
        self._array = read_image(path).permute(1, 2, 0).numpy()
        self.level_dimensions = [(self._array.shape[1], self._array.shape[0])]
        self.level_downsamples = [1.0]
        self.vendor = "image"

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        return self._array[y : y + size[1], x : x + size[0]].copy()


class OmeZarrReader(SlideReader):
    """An OME-Zarr (NGFF 0.4) image pyramid with ``(c, y, x)`` (or ``(y, x, c)``) RGB levels."""

    backend = "zarr"

    def __init__(self, path: str | Path, mpp: float | tuple[float, float] | None = None) -> None:
        import zarr

        super().__init__(path, mpp)
        self._group = zarr.open_group(str(path), mode="r")
        multiscales = self._group.attrs.get("multiscales")
        if not multiscales:
            raise ValueError(f"path: expected NGFF 'multiscales' metadata in {path}, got none")
        ms = multiscales[0]
        names = [a["name"] if isinstance(a, dict) else a for a in ms.get("axes", ["c", "y", "x"])]
        self._axes = "".join(n.upper() if n in "yx" else "S" if n == "c" else n.upper() for n in names)
        self._datasets = ms["datasets"]
        self._levels = [self._group[d["path"]] for d in self._datasets]
        yi, xi = self._axes.index("Y"), self._axes.index("X")
        self.level_dimensions = [(int(a.shape[xi]), int(a.shape[yi])) for a in self._levels]
        self.level_downsamples = [self.level_dimensions[0][0] / d[0] for d in self.level_dimensions]
        self.vendor = "ome-zarr"

    def _metadata_mpp(self) -> tuple[float, float] | None:
        ms = self._group.attrs["multiscales"][0]
        axes = ms.get("axes", [])
        units = [a.get("unit") for a in axes if isinstance(a, dict) and a.get("type") == "space"]
        if not units or units[0] not in ("micrometer", "micron"):
            return None
        for transform in self._datasets[0].get("coordinateTransformations", []):
            if transform.get("type") == "scale":
                scale = transform["scale"]
                return _as_mpp((float(scale[self._axes.index("X")]), float(scale[self._axes.index("Y")])))
        return None

    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return _read_array_region(self._levels[level], self._axes, location, self.level_downsamples[level], size)


def _is_ome_tiff(path: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            return bool(tif.is_ome)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: let the backends decide
        return False


def _read_array_region(
    array, axes: str, location: tuple[int, int], factor: float, size: tuple[int, int]  # noqa: ANN001 - zarr array
) -> np.ndarray:
    """Read ``size=(w,h)`` at level-0 ``location`` from an array with ``axes`` (Y, X, optional S, others → 0)."""
    x, y = int(round(location[0] / factor)), int(round(location[1] / factor))
    w, h = size
    index = tuple(
        slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None) if a == "S" else 0 for a in axes
    )
    region = np.asarray(array[index])
    kept = [a for a in axes if a in "YXS"]
    if "S" not in kept:
        region = region[..., None]
        kept.append("S")
    region = np.moveaxis(region, [kept.index("Y"), kept.index("X"), kept.index("S")], [0, 1, 2])
    return _to_rgb_uint8(region)


def _to_rgb_uint8(region: np.ndarray) -> np.ndarray:
    if region.shape[-1] == 1:
        region = np.repeat(region, 3, axis=-1)
    if region.shape[-1] == 4:
        region = composite_on_white(region.astype(np.uint8)) if region.dtype == np.uint8 else region[..., :3]
    region = region[..., :3]
    if region.dtype == np.uint16:
        region = (region // 257).astype(np.uint8)
    elif region.dtype != np.uint8:
        region = np.clip(region, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(region)


def open_slide(path: str | Path, mpp: float | tuple[float, float] | None = None) -> SlideReader:
    """Open a slide with the first backend that reads it.

    Args:
        path: slide or image file.
        mpp: microns per pixel at level 0, overriding (or standing in for missing) metadata.

    Returns:
        A :class:`SlideReader`; use it as a context manager to close it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no backend can read the file (corrupt or unsupported), naming each backend's error.

    Example:
        >>> with open_slide("samples/slides/he_cmu_small_region.svs") as slide:  # doctest: +SKIP
        ...     slide.read_region((0, 0), 0, (256, 256)).shape
        (256, 256, 3)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: expected a slide file, got {path} (missing)")
    suffix = path.suffix.lower()
    name = path.name.lower()
    errors: list[str] = []
    if suffix in PLAIN_SUFFIXES:
        backends: tuple[type[SlideReader], ...] = (PillowImageReader,)
    elif (path.is_dir() and (path / ".zattrs").exists()) or name.endswith(".zarr"):
        backends = (OmeZarrReader,)
    elif suffix in (".tif", ".tiff") and _is_ome_tiff(path):
        # OpenSlide reads only the first level of SubIFD pyramids.
        backends = (TiffFileReader, OpenSlideReader)
    elif suffix in SLIDE_SUFFIXES or path.is_dir():
        backends = (OpenSlideReader, TiffFileReader)
    else:
        backends = (OpenSlideReader, TiffFileReader, PillowImageReader)
    for backend in backends:
        try:
            reader = backend(path, mpp)
            if reader.level_count == 0 or min(reader.dimensions) <= 0:
                reader.close()
                raise ValueError("no image levels")
            return reader
        except Exception as error:  # noqa: BLE001 - try the next backend, report all at the end
            errors.append(f"{backend.backend}: {type(error).__name__}: {error}")
    raise ValueError(f"path: expected a readable slide, got {path} that no backend reads ({'; '.join(errors)})")
