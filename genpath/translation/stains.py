"""IHC colour analysis: DAB by colour deconvolution, DAB agreement, and an "is this IHC?" check.

1. :func:`rgb_to_hdx`: Ruifrok–Johnston deconvolution with the haematoxylin–DAB matrix of
   scikit-image (``skimage.color.hdx_from_rgb``), in optical density units
   ``OD = log10(255 / I)`` as QuPath reports them.
2. :func:`dab_positive_fraction`: share of tissue pixels whose DAB OD exceeds a threshold
   (0.2 by default, QuPath's usual weak-positive DAB threshold).
3. :func:`dab_correlation`: Pearson correlation of DAB density maps at low resolution (mean
   pooled), which is what survives the misregistration of consecutive sections.
4. :func:`brown_share`: share of coloured pixels whose hue is brown/orange (DAB) rather than
   pink/purple (eosin/haematoxylin) or blue. H&E has none; IHC is dominated by them, even for
   HER2 0 (the haematoxylin counterstain of IHC is bluish, DAB is brown). :func:`looks_like_ihc`
   thresholds it, so an H&E→IHC model can warn when it is handed IHC.

Measured on the 13 BCI pairs in the shared data: brown share of H&E 0.00 for all 13, of IHC
0.56-1.00 (coloured pixels: saturation > 0.07, value < 0.93).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genpath.image_tensor import to_float_batch


def _hdx_from_rgb() -> torch.Tensor:
    from skimage.color import hdx_from_rgb

    return torch.tensor(hdx_from_rgb, dtype=torch.float32)


def rgb_to_hdx(images: torch.Tensor) -> torch.Tensor:
    """Haematoxylin, DAB and residual optical densities (log10 units).

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)`` uint8/float RGB -> ``(B,3,H,W)`` float (channel 1 = DAB).

    Example:
        >>> white = torch.ones(1, 3, 4, 4)
        >>> float(rgb_to_hdx(white).abs().max()) < 1e-2
        True
    """
    rgb, _ = to_float_batch(images, "images")
    od = -torch.log10((rgb.float() * 255).clamp(min=1.0) / 255.0)
    return torch.einsum("bchw,cd->bdhw", od, _hdx_from_rgb().to(od.device))


def dab_density(images: torch.Tensor) -> torch.Tensor:
    """DAB optical density, clamped at 0, ``(B,1,H,W)``."""
    return rgb_to_hdx(images)[:, 1:2].clamp(min=0)


def tissue_pixels(images: torch.Tensor, od_threshold: float = 0.08) -> torch.Tensor:
    """Pixels with any stain (total OD above ``od_threshold``), ``(B,1,H,W)`` bool."""
    rgb, _ = to_float_batch(images, "images")
    od = -torch.log10((rgb.float() * 255).clamp(min=1.0) / 255.0)
    return od.sum(1, keepdim=True) > od_threshold


def dab_positive_fraction(images: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Share of tissue pixels with DAB OD above ``threshold``, per image ``(B,)``.

    Example:
        >>> float(dab_positive_fraction(torch.ones(2, 3, 8, 8))[0])
        0.0
    """
    dab, tissue = dab_density(images), tissue_pixels(images)
    positive = (dab > threshold) & tissue
    return positive.flatten(1).sum(1) / tissue.flatten(1).sum(1).clamp(min=1)


def dab_correlation(prediction: torch.Tensor, target: torch.Tensor, pool: int = 32) -> torch.Tensor:
    """Pearson correlation of ``pool``-mean-pooled DAB density maps, per image ``(B,)``.

    A constant map has no defined correlation: NaN is returned for it.

    Example:
        >>> x = torch.rand(1, 3, 64, 64)
        >>> round(float(dab_correlation(x, x, pool=8)[0]), 4)
        1.0
    """
    p, t = dab_density(prediction), dab_density(target)
    if p.shape != t.shape:
        raise ValueError(f"target: expected the prediction's shape {tuple(p.shape)}, got {tuple(t.shape)}")
    p, t = F.avg_pool2d(p, pool).flatten(1), F.avg_pool2d(t, pool).flatten(1)
    p, t = p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    denominator = (p.norm(dim=1) * t.norm(dim=1))
    return torch.where(denominator > 1e-12, (p * t).sum(1) / denominator.clamp(min=1e-12),
                       torch.full_like(denominator, float("nan")))


def brown_share(images: torch.Tensor, min_saturation: float = 0.07, max_value: float = 0.93) -> torch.Tensor:
    """Share of coloured pixels with a brown/orange hue (5°-70°), per image ``(B,)``; 0 if none is coloured."""
    from genpath.utils.quiet_imports import import_kornia

    import_kornia()
    import kornia

    rgb, _ = to_float_batch(images, "images")
    hsv = kornia.color.rgb_to_hsv(rgb.float())
    hue = hsv[:, 0] * (180.0 / math.pi)
    coloured = (hsv[:, 1] > min_saturation) & (hsv[:, 2] < max_value)
    brown = coloured & (hue >= 5.0) & (hue <= 70.0)
    return brown.flatten(1).sum(1) / coloured.flatten(1).sum(1).clamp(min=1)


def looks_like_ihc(images: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Whether each image looks like DAB IHC rather than H&E (brown share above ``threshold``), ``(B,)`` bool."""
    return brown_share(images) > threshold
