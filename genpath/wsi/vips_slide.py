"""The slide engine's fast path: a fixed per-pixel map run through libvips, read to pyramid in C.

When a slide's tile function is one fixed per-pixel map (a classical normalizer after its
per-slide fit: :class:`~normalization.base.SlideMap`) and it can express that map as a libvips
pipeline (``tile_function.vips_map(image)``), the whole slide streams through libvips: threaded
decode, the map, background windows kept as they are, pyramid and tiled BigTIFF encode, all in
C with memory bounded by a few tile rows. The Python tile engine stays the reference path and
takes over whenever this one does not apply (:func:`vips_source`) or libvips fails.

Applies when: the output is a TIFF, windows do not overlap (``overlap`` 0, so each tile is the
map of its own pixels), level 0 is processed, and libvips reads the slide file itself (TIFF,
SVS: ``pyvips``' ``tiffload``, with the reader's size). Output: the same layout as
:class:`~genpath.io.slide_writer.TiffPyramidWriter` (levels in the main IFD chain, reduced-
resolution pages, resolution tags, the Aperio description), written under the same temporary
name and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from genpath.io.slide import SlideReader
from genpath.io.slide_writer import aperio_description
from genpath.utils.logging import get_logger
from genpath.wsi.options import SlideOptions

logger = get_logger(__name__)

#: File suffixes libvips' ``tiffload`` reads as the slide's level 0 (page 0).
VIPS_SUFFIXES = (".svs", ".tif", ".tiff")


def vips_available() -> bool:
    """Whether ``pyvips`` imports with a libvips that can load and save TIFF."""
    try:
        import pyvips
    except (ImportError, OSError):
        return False
    return bool(pyvips.type_find("VipsOperation", "tiffload")) and bool(pyvips.type_find("VipsOperation", "tiffsave"))


def vips_source(reader: SlideReader, options: SlideOptions) -> Any | None:
    """Open the level to process as a sequential 3-band uchar ``pyvips.Image`` (None: no fast path).

    None when the options need the tile engine (OME-Zarr output, overlap, a level above 0),
    pyvips is missing, the file is not a TIFF/SVS, or libvips sees another size than the reader.
    """
    if options.output_format != "tiff" or options.overlap or options.level != 0 or not options.fast_path:
        return None
    path = Path(reader.path)
    if path.suffix.lower() not in VIPS_SUFFIXES or not path.is_file() or not vips_available():
        return None
    import pyvips

    try:
        image = pyvips.Image.tiffload(str(path), page=0, access="sequential")
    except pyvips.Error as error:
        logger.debug("%s: libvips cannot read it (%s); using the tile engine", path, str(error).splitlines()[0])
        return None
    if (image.width, image.height) != tuple(reader.dimensions) or image.format != "uchar" or image.bands not in (3, 4):
        return None
    if image.bands == 4:
        image = image.flatten(background=[255, 255, 255])  # as genpath.io.slide.composite_on_white
    return image


def foreground_image(foreground: np.ndarray, tile: int, width: int, height: int) -> Any:
    """Build a uchar mask image (255 = mapped) from a per-tile boolean ``(rows, cols)`` grid."""
    import pyvips

    cells = np.ascontiguousarray(foreground.astype(np.uint8) * 255)
    grid = pyvips.Image.new_from_memory(cells.tobytes(), cells.shape[1], cells.shape[0], 1, "uchar")
    return grid.zoom(tile, tile).crop(0, 0, width, height)


def write_mapped_slide(
    source: Any,
    mapped: Any,
    foreground: np.ndarray,
    output: Path,
    options: SlideOptions,
    mpp: float | None,
    progress: Callable[[float], None] | None = None,
) -> Path:
    """Write ``mapped`` where ``foreground`` (per tile) is set and ``source`` elsewhere as a pyramidal BigTIFF.

    Args:
        source: the level's pixels (3-band uchar ``pyvips.Image``).
        mapped: the same through the tile function's map.
        foreground: ``(rows, cols)`` bool, one per output tile: mapped tiles.
        output: final path; written as ``.<name>.partial`` beside it and renamed when complete.
        options: tile size, compression, quality, Aperio description.
        mpp: microns per pixel of the output level (resolution tags), or None.
        progress: called with the share of the image written so far (0..1).

    Returns:
        ``output``.
    """
    width, height, tile = source.width, source.height, options.tile_size
    if foreground.all():
        image = mapped
    elif not foreground.any():
        image = source
    else:
        image = foreground_image(foreground, tile, width, height).ifthenelse(mapped, source)
    image = image.copy()  # own metadata: the source's description is not this file's
    image.remove("image-description")
    save: dict[str, Any] = {
        "tile": True, "tile_width": tile, "tile_height": tile, "pyramid": True, "bigtiff": True,
        "region_shrink": "mean",
    }
    if options.compression == "jpeg":
        save.update(compression="jpeg", Q=options.quality)
    else:
        save.update(compression="deflate", predictor="horizontal")
    if mpp:
        save.update(xres=1000.0 / mpp, yres=1000.0 / mpp, resunit="cm")
    if options.aperio:
        magnification = round(10.0 / mpp) if mpp else None
        image.set_type(_gstr(), "image-description", aperio_description(width, height, tile, mpp, magnification))
    if progress is not None:
        image.set_progress(True)
        image.signal_connect("eval", lambda _image, state: progress(min(1.0, state.percent / 100.0)))
    partial = output.with_name(f".{output.name}.partial")
    try:
        image.tiffsave(str(partial), **save)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def _gstr() -> Any:
    import pyvips

    return pyvips.GValue.gstr_type
