"""Small JPEG thumbnails for reports and contact sheets, written atomically.

Anything image-like goes in: a uint8 or float ``(3,H,W)`` tensor, a ``(H,W,3)``/``(H,W)`` numpy
array (bool masks become black and white), or an image file. The longest side is shrunk to
``size`` (never enlarged) and the result is saved as a JPEG (or PNG by suffix) under a
temporary name and renamed, so a report never links a half-written file.

Example:
    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.jpg"
    >>> save_thumbnail(torch.zeros(3, 400, 200, dtype=torch.uint8), path, size=100).is_file()
    True
    >>> from PIL import Image
    >>> Image.open(path).size
    (50, 100)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.utils.atomic import atomic_path

__all__ = ["as_hwc_uint8", "save_thumbnail", "shrink"]


def as_hwc_uint8(image: Any) -> np.ndarray:
    """Return ``image`` (tensor ``(3,H,W)``, array ``(H,W[,3])``, file path) as a uint8 ``(H,W,3)`` array.

    Float values are taken as [0, 1] (clipped); bool masks become 0/255 grey.

    Raises:
        ValueError: a shape that is not one image.
        FileNotFoundError / ValueError: an unreadable file (from :func:`genpath.io.images.read_image`).
    """
    if isinstance(image, str | Path):
        from genpath.io.images import read_image

        image = read_image(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.ndim == 3 and array.shape[0] in (1, 3):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float32)) * 255.0, 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise ValueError(f"image: expected one image (3,H,W) or (H,W[,3]), got shape {tuple(np.shape(image))}")
    return np.ascontiguousarray(array)


def shrink(image: Any, size: int) -> np.ndarray:
    """Resize ``image`` so its longest side is at most ``size`` pixels (antialiased); uint8 ``(h,w,3)``."""
    from PIL import Image

    array = as_hwc_uint8(image)
    height, width = array.shape[:2]
    scale = min(1.0, size / max(height, width))
    if scale >= 1.0:
        return array
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(array).resize(shape, Image.Resampling.LANCZOS))


def save_thumbnail(image: Any, path: str | Path, size: int = 160, quality: int = 80) -> Path:
    """Write a thumbnail of ``image`` (longest side ``size``) to ``path`` atomically; returns ``path``.

    Args:
        image: tensor, array or image file (see :func:`as_hwc_uint8`).
        path: ``.jpg``/``.jpeg`` (JPEG at ``quality``) or ``.png``.
        size: longest side in pixels (smaller images are kept as they are).
        quality: JPEG quality.
    """
    from PIL import Image

    if not (isinstance(size, int) and size > 0):
        raise ValueError(f"size: expected a positive number of pixels, got {size!r}")
    path = Path(path)
    picture = Image.fromarray(shrink(image, size))
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            picture.save(tmp, format="JPEG", quality=quality, optimize=True)
        else:
            picture.save(tmp, format="PNG", optimize=True)
    return path
