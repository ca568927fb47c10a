"""Stain augmentations as pure, batched tensor functions.

Inputs are float RGB ``(B,3,H,W)`` in [0, 1]; parameters follow :mod:`augment.params`. The
transform classes in :mod:`augment.stain` sample those parameters and call these functions.
"""

from __future__ import annotations

import torch
from skimage.color import hed_from_rgb, rgb_from_hed

from normalization.functional import (
    concentrations_lstsq,
    lab_statistics,
    macenko_stain_matrix,
    od_to_rgb,
    reinhard_transfer,
    render_od,
    rgb_to_od,
    sample_pixels,
    tissue_mask_od,
)

_LOG_ADJUST = float(torch.log(torch.tensor(1e-6)))
HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float64)
RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float64)


def rgb_to_hed(rgb: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Ruifrok–Johnston colour deconvolution into H, E, DAB, as ``skimage.color.rgb2hed``.

    Args:
        rgb: ``(B,3,H,W)`` float in [0, 1].
        clip: clamp negative concentrations to 0 like scikit-image; jitter keeps them
            (``clip=False``) so that identity parameters give back the input exactly.

    Example:
        >>> rgb_to_hed(torch.ones(1, 3, 2, 2)).abs().max() < 1e-6
        tensor(True)
    """
    log_rgb = torch.log(rgb.clamp(min=1e-6)) / _LOG_ADJUST
    hed = torch.einsum("bchw,cd->bdhw", log_rgb, HED_FROM_RGB.to(rgb))
    return hed.clamp(min=0) if clip else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (``skimage.color.hed2rgb``), clamped to [0, 1]."""
    log_rgb = torch.einsum("bdhw,dc->bchw", hed * _LOG_ADJUST, RGB_FROM_HED.to(hed))
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_jitter(rgb: torch.Tensor, hed_scale: torch.Tensor, hed_shift: torch.Tensor) -> torch.Tensor:
    """Tellez et al. HED jitter: ``hed' = hed · scale + shift`` per sample and channel.

    Shape:
        rgb ``(B,3,H,W)``, hed_scale ``(B,3)``, hed_shift ``(B,3)`` -> ``(B,3,H,W)``.

    Example:
        >>> x = torch.rand(2, 3, 8, 8) * 0.8 + 0.1
        >>> y = hed_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
        >>> torch.allclose(x, y, atol=1e-5)
        True
    """
    hed = rgb_to_hed(rgb, clip=False)
    hed = hed * hed_scale.to(hed)[..., None, None] + hed_shift.to(hed)[..., None, None]
    return hed_to_rgb(hed)


def stain_jitter(
    rgb: torch.Tensor,
    stain_vector_shift: torch.Tensor,
    concentration_scale: torch.Tensor,
    concentration_shift: torch.Tensor,
    io: float = 240.0,
    max_pixels: int = 4096,
) -> torch.Tensor:
    """Perturb each tile's own Macenko stain vectors and concentrations, then re-render.

    Tiles whose stains cannot be estimated use the reference H&E vectors, so background tiles
    pass through almost unchanged (their OD is near zero).

    Shape:
        rgb ``(B,3,H,W)``, stain_vector_shift ``(B,3,2)``, concentration_* ``(B,2)`` -> ``(B,3,H,W)``.
    """
    od = rgb_to_od(rgb, io)
    pixels = sample_pixels(od, max_pixels)
    stains, _ = macenko_stain_matrix(pixels, tissue_mask_od(pixels, dim=-1))
    conc = concentrations_lstsq(od, stains)
    residual = od - render_od(conc, stains)  # what two stains do not explain: keep it
    new_stains = torch.nn.functional.normalize(
        (stains + stain_vector_shift.to(stains)).clamp(min=1e-3), dim=1
    )
    conc = conc * concentration_scale.to(conc)[..., None, None] + concentration_shift.to(conc)[..., None, None]
    return od_to_rgb(render_od(conc, new_stains) + residual, io)


def lab_transfer(
    rgb: torch.Tensor,
    lab_mean: torch.Tensor,
    lab_std: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Move each tile's LAB statistics to the given ones (the RandStainNA augmentation step).

    Shape:
        rgb ``(B,3,H,W)``, lab_mean/lab_std ``(B,3)``, mask ``(B,H,W)`` or None -> ``(B,3,H,W)``.
    """
    mean, std = lab_statistics(rgb, mask)
    return reinhard_transfer(rgb, mean, std, lab_mean.to(rgb), lab_std.to(rgb).clamp(min=1e-3))
