"""Classical nuclei segmentation of H&E: colour deconvolution, Otsu, distance-transform watershed.

No training and no weights: the haematoxylin channel of scikit-image's ``rgb2hed`` (Ruifrok &
Johnston stain vectors), thresholded by Otsu's method. Two uses:

* :func:`haematoxylin_foreground`: the per-image foreground that ``benchmarks/mask_adherence.py``
  compares with conditioning masks (the same rule on real and generated tiles);
* :func:`segment_nuclei`: instance label maps (smoothing, Otsu, small-object removal, hole filling,
  distance-transform watershed) to *generate* nuclei masks for unlabelled H&E, e.g. training
  sources of the mask ControlNet (``{"generated": ...}`` in :mod:`genpath.training.mask_data`).

These masks are approximate: Otsu splits any image into two classes, so tissue without nuclei
still gets a "nuclear" class, and dark stroma or debris can pass. The minimum ``contrast`` between
the two classes' haematoxylin means guards the first case.
"""

from __future__ import annotations

import numpy as np


def haematoxylin(image: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density of an RGB uint8 image ``(H,W,3)`` -> float ``(H,W)``."""
    from skimage.color import rgb2hed

    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected an RGB array (H, W, 3), got shape {image.shape}")
    return rgb2hed(image)[..., 0]


def haematoxylin_foreground(images: np.ndarray) -> np.ndarray:
    """Haematoxylin + per-image Otsu: uint8 ``(B,H,W,3)`` -> bool ``(B,H,W)`` (all False for flat images).

    Example:
        >>> import numpy as np
        >>> tile = np.full((1, 8, 8, 3), 230, np.uint8); tile[0, 2:5, 2:5] = (70, 40, 120)
        >>> int(haematoxylin_foreground(tile).sum())
        9
    """
    from skimage.filters import threshold_otsu

    if images.ndim != 4:
        raise ValueError(f"images: expected a batch (B, H, W, 3), got shape {images.shape}")
    out = []
    for image in images:
        h = haematoxylin(image)
        out.append(h > threshold_otsu(h) if np.ptp(h) > 1e-6 else np.zeros(h.shape, bool))
    return np.stack(out) if out else np.zeros(images.shape[:3], bool)


def segment_nuclei(image: np.ndarray, min_area: int = 30, sigma: float = 1.0, min_distance: int = 4,
                   contrast: float = 0.02) -> np.ndarray:
    """Nuclei instance labels of an H&E image by colour deconvolution + Otsu + watershed.

    Args:
        image: RGB uint8 ``(H,W,3)``.
        min_area: objects smaller than this (pixels) are dropped, holes smaller than it filled.
        sigma: Gaussian smoothing of the haematoxylin channel before the threshold (pixels).
        min_distance: least distance between two nucleus centres (peaks of the distance map).
        contrast: least difference of mean haematoxylin density between the two Otsu classes;
            below it the image is taken to hold no nuclei (all zeros).

    Returns:
        int32 ``(H,W)``: 0 background, 1..N nuclei.

    Example:
        >>> import numpy as np
        >>> img = np.full((48, 48, 3), 235, np.uint8)
        >>> img[8:20, 8:20] = img[28:40, 26:38] = (60, 30, 110)
        >>> int(segment_nuclei(img, min_area=20).max())
        2
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    if min_area < 0 or sigma < 0 or min_distance < 1:
        raise ValueError(f"min_area / sigma / min_distance: expected >= 0 / >= 0 / >= 1, got {min_area} / {sigma} / "
                         f"{min_distance}")
    h = haematoxylin(image)
    if sigma > 0:
        h = gaussian(h, sigma=sigma)
    empty = np.zeros(h.shape, np.int32)
    if np.ptp(h) <= 1e-6:
        return empty
    threshold = threshold_otsu(h)
    fg = h > threshold
    if not fg.any() or fg.all() or h[fg].mean() - h[~fg].mean() < contrast:
        return empty
    if min_area:
        fg = remove_small_holes(remove_small_objects(fg, max_size=min_area - 1), max_size=min_area - 1)
    if not fg.any():
        return empty
    distance = ndimage.distance_transform_edt(fg)
    components, _ = ndimage.label(fg)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(h.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=fg)
    # components without a peak (rare: plateaus) keep their own label
    missing = fg & (labels == 0)
    if missing.any():
        extra, n = ndimage.label(missing)
        labels[missing] = extra[missing] + labels.max()
    if min_area:
        sizes = np.bincount(labels.ravel())
        labels[sizes[labels] < min_area // 2] = 0
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]
