"""Tissue detection on low-resolution slide images.

1. Convert to HSV and keep the saturation channel (glass and background are unsaturated).
2. Median-blur it to remove JPEG noise and dust.
3. Threshold with Otsu, but never below ``min_saturation`` (a slide with no tissue would
   otherwise be split in two by noise).
4. Clean up: remove small objects, close small gaps, fill small holes.
"""

from __future__ import annotations

import numpy as np


def detect_tissue(
    rgb: np.ndarray,
    median_size: int = 5,
    min_saturation: float = 0.05,
    min_object_fraction: float = 1e-4,
    closing_radius: int = 2,
    max_hole_fraction: float = 1e-3,
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image.

    Args:
        rgb: uint8 ``(H,W,3)`` (numpy, at an I/O edge) or ``(3,H,W)`` torch/numpy array.
        median_size: side of the square median filter, in pixels.
        min_saturation: lowest saturation threshold (0–1) allowed, whatever Otsu says.
        min_object_fraction: objects smaller than this share of the image are dropped.
        closing_radius: radius of the disk used for morphological closing.
        max_hole_fraction: holes smaller than this share of the image are filled.

    Returns:
        ``(H,W)`` bool mask, True on tissue.

    Example:
        >>> rgb = np.full((64, 64, 3), 245, np.uint8); rgb[16:48, 16:48] = (180, 90, 160)
        >>> detect_tissue(rgb)[32, 32], detect_tissue(rgb)[2, 2]
        (np.True_, np.False_)
    """
    from scipy import ndimage
    from skimage import filters, morphology

    array = np.asarray(rgb)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"rgb: expected an (H,W,3) or (3,H,W) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float64) * (255 if array.max() <= 1.0 else 1), 0, 255)
        array = array.astype(np.uint8)
    # HSV saturation, (max − min) / max, in float32 (rgb2hsv would allocate three float64 planes).
    high = array.max(-1).astype(np.float32)
    low = array.min(-1).astype(np.float32)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)
    saturation[high < 20] = 0.0  # black pixels (pen, folds, scanner edges) carry meaningless saturation
    blurred = ndimage.median_filter(saturation, size=median_size) if median_size > 1 else saturation
    try:
        threshold = float(filters.threshold_otsu(blurred))
    except ValueError:  # a constant image
        threshold = min_saturation
    mask = blurred > max(threshold, min_saturation)
    area = mask.size
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(min_object_fraction * area)))
    if closing_radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(closing_radius), border_value=0) | mask
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(max_hole_fraction * area)))
    return mask


def tile_tissue_fraction(
    mask: np.ndarray, mask_downsample: float, location: tuple[int, int], size: tuple[int, int]
) -> float:
    """Share of tissue in a level-0 box ``location=(x,y)``, ``size=(w,h)`` according to a low-res mask."""
    x0, y0 = int(location[0] / mask_downsample), int(location[1] / mask_downsample)
    x1 = int(np.ceil((location[0] + size[0]) / mask_downsample))
    y1 = int(np.ceil((location[1] + size[1]) / mask_downsample))
    window = mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
    return float(window.mean()) if window.size else 0.0
