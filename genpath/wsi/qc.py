"""QC images of a processed slide: before/after thumbnails side by side and the tissue mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from genpath.io.slide import SlideReader, open_slide
from genpath.wsi.options import SlideOptions


def _read_output_thumbnail(output: Path, shape: tuple[int, int], level_size: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    if output.suffix == ".zarr" or output.is_dir():
        import zarr

        group = zarr.open_group(str(output), mode="r")
        keys = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
        coarsest = next((k for k in keys if max(group[k].shape[1:]) <= 2 * max(shape)), keys[-1])
        image = np.moveaxis(np.asarray(group[coarsest]), 0, -1)
    else:
        quick = _vips_thumbnail(output, shape)
        if quick is not None:
            return quick
        with open_slide(output) as slide:
            image = slide.thumbnail(max(1.0, level_size[0] / shape[1]))
    return np.clip(resize(image, shape, order=1, anti_aliasing=True, preserve_range=True).round(), 0, 255).astype(
        np.uint8
    )


def _vips_thumbnail(output: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Shrink the output TIFF to ``shape`` with libvips (from its coarsest useful level); None without pyvips."""
    from genpath.wsi.vips_slide import vips_available

    if not vips_available():
        return None
    import pyvips

    try:
        image = pyvips.Image.thumbnail(str(output), shape[1], height=shape[0], size="force")
        array = image.numpy()
    except pyvips.Error:
        return None
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, -1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


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
