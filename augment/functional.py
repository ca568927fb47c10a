"""Stain augmentations as pure, batched tensor functions.

Inputs are float RGB ``(B,3,H,W)`` in [0, 1]; parameters follow :mod:`augment.params`. The
transform classes in :mod:`augment.stain` sample those parameters and call these functions.

The colour operations give kornia's results (to float rounding) in a few in-place passes each:
saturation and hue without HSV tensors, morphology as separable max/min filters, blur as sums of
shifted slices, the HED shift as one 3×3 map in log space. :func:`apply_augmentation_params`
skips the samples whose value is the identity. The geometric part lives in :mod:`augment.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed

from augment.geometry import (  # noqa: F401 - the geometric functions are part of this module's API
    _grouped,
    _per_sample,
    apply_geometric_params,
    crop_resize,
    crop_resize_matrix,
    dihedral,
    dihedral_matrix,
    geometric_matrix,
)
from augment.params import PARAM_SCHEMA
from normalization.functional import (
    concentrations_lstsq,
    lab_to_rgb,
    macenko_stain_matrix,
    od_to_rgb,
    render_od,
    rgb_to_lab,
    rgb_to_od,
    sample_pixels,
    tissue_mask_od,
)
from normalization.fused import reinhard_own_statistics_uint8, tissue_mask_of_bytes

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
    # rgb_to_hed, the scale and shift, and hed_to_rgb are affine in log RGB: one 3x3 map per sample,
    # log x' = Rᵀ·diag(scale)·Hᵀ·log x + log(1e-6)·Rᵀ·shift (H, R: HED_FROM_RGB, RGB_FROM_HED)
    b = rgb.shape[0]
    h_t, r_t = HED_FROM_RGB.T.to(rgb.device), RGB_FROM_HED.T.to(rgb.device)
    scale = hed_scale.to(device=rgb.device, dtype=torch.float64).expand(b, 3)
    shift = hed_shift.to(device=rgb.device, dtype=torch.float64).expand(b, 3)
    matrix = (r_t * scale[:, None, :]) @ h_t  # (B,3,3)
    offset = _LOG_ADJUST * (shift @ RGB_FROM_HED.to(rgb.device))
    log_rgb = torch.log(rgb.clamp(min=1e-6)).reshape(b, 3, -1)
    out = torch.baddbmm(offset.to(rgb.dtype)[..., None], matrix.to(rgb.dtype), log_rgb)
    return out.exp_().clamp_(0.0, 1.0).reshape(rgb.shape)


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
    lab = rgb_to_lab(rgb)  # once, for the statistics and the transfer
    weight = torch.ones_like(lab[:, :1]) if mask is None else mask[:, None].to(lab)
    count = weight.sum((-2, -1)).clamp(min=1.0)
    mean = (lab * weight).sum((-2, -1)) / count
    std = ((((lab - mean[..., None, None]) ** 2) * weight).sum((-2, -1)) / count).sqrt().clamp(min=1e-3)
    scale = (lab_std.to(rgb).clamp(min=1e-3) / std)[..., None, None]
    lab = (lab - mean[..., None, None]) * scale + lab_mean.to(rgb)[..., None, None]
    lab[:, 0].clamp_(0.0, 100.0)
    return lab_to_rgb(lab, clip=True)


def lab_transfer_uint8(rgb: torch.Tensor, lab_mean: torch.Tensor, lab_std: torch.Tensor) -> torch.Tensor:
    """:func:`lab_transfer` for images that came from uint8 (``rgb`` is bytes / 255), through byte tables.

    The tissue mask (RandStainNA's: OD tissue pixels, or every pixel when fewer than 64), the LAB
    statistics and the transfer use :mod:`normalization.fused`'s tables; the result is bytes / 255
    within one level of the float path's, rounded.

    Shape:
        rgb ``(B,3,H,W)`` float holding bytes / 255, lab_mean/lab_std ``(B,3)`` -> ``(B,3,H,W)``.
    """
    images = (rgb * 255.0).round_().to(torch.uint8)
    mask = tissue_mask_of_bytes(images)
    mask = mask | (mask.flatten(1).sum(-1) < 64)[:, None, None]
    out = reinhard_own_statistics_uint8(images, mask, lab_mean.float(), lab_std.float().clamp(min=1e-3))
    return out.to(rgb.dtype).div_(255.0)


# -- the HistAug transform family (colour, morphology, blur; geometry in augment.geometry) --------


def adjust_brightness(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply RGB by ``factor`` per sample (torchvision's brightness), clamped to [0, 1].

    Shape:
        rgb ``(B,3,H,W)``, factor ``(B,)`` -> ``(B,3,H,W)``.
    """
    return (rgb * _per_sample(factor, rgb)).clamp(0.0, 1.0)


def adjust_contrast(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's grey mean (torchvision's contrast; kornia's formula, its grey weights)."""
    grey = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device)
    mean = (rgb.mean((-2, -1)) @ grey).reshape(-1, 1, 1, 1)
    f = _per_sample(factor, rgb)
    return (rgb * f + mean * (1 - f)).clamp_(0.0, 1.0)


def _value_chroma(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HSV value (channel max) and chroma (max - min), ``(B,1,H,W)`` each."""
    value = rgb.amax(-3, keepdim=True)
    return value, value - rgb.amin(-3, keepdim=True)


def adjust_saturation(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale HSV saturation per sample, clamped to [0, 1] (kornia's ``adjust_saturation``), without HSV.

    With hue and value fixed, every channel moves along ``x' = v - (v - x)·s'/s``, and
    ``s'/s = min(factor, 1/s)`` where ``s = chroma / (v + 1e-8)`` (kornia's ``eps``).
    """
    value, chroma = _value_chroma(rgb)
    ratio = torch.minimum(_per_sample(factor, rgb), (value + 1e-8).div_(chroma))  # grey (chroma 0): inf, unused
    return (rgb - value).mul_(ratio).add_(value).clamp_(0.0, 1.0)


def adjust_hue(rgb: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` of a full circle per sample (kornia's ``adjust_hue``), without HSV tensors.

    The hue sextant ``h`` in [0, 6) comes from the channel holding the maximum, as in kornia's
    ``rgb_to_hsv``; the rotated pixel is ``v - chroma·clamp(min(k, 4 - k), 0, 1)`` per channel with
    ``k = (n + h') mod 6``, n = 5, 3, 1 for R, G, B (the standard HSV-to-RGB formula).
    """
    value, chroma = _value_chroma(rgb)
    r, g, b = rgb.unsqueeze(-3).unbind(-4)  # (B,1,H,W) views
    # 0/1 float masks and lerp (exact at weights 0 and 1): much cheaper than bool masks and where
    top_r, top_g = torch.eq(r, value, out=torch.empty_like(value)), torch.eq(g, value, out=torch.empty_like(value))
    # sextant·chroma, then the sextant: (g-b)/c, (b-r)/c + 2 or (r-g)/c + 4 by the channel holding the max
    not_r = torch.lerp((r - g).add_(chroma, alpha=4.0), (b - r).add_(chroma, alpha=2.0), top_g)
    sextant = torch.lerp(not_r, g - b, top_r)
    sextant.div_(chroma.clamp(min=torch.finfo(rgb.dtype).tiny)).add_(6.0 * _per_sample(turns, rgb))
    n = torch.tensor([5.0, 3.0, 1.0], dtype=rgb.dtype, device=rgb.device).reshape(3, 1, 1)
    k = torch.remainder(sextant + n, 6.0)
    # min(k, 4 - k) = 2 - |k - 2| on [0, 6): all in place
    weight = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return weight.mul_(chroma).neg_().add_(value).clamp_(0.0, 1.0)


def adjust_gamma(rgb: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``rgb ** gamma`` per sample, clamped to [0, 1] (kornia's ``adjust_gamma``)."""
    # exp(gamma·log x): two vectorised passes, cheaper than pow's; log 0 = -inf gives 0 (gamma > 0)
    return torch.log(rgb).mul_(_per_sample(gamma, rgb)).exp_().clamp_(0.0, 1.0)


def morphology(rgb: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Grey-scale erosion (``radius < 0``) or dilation (``> 0``) with a ``(2r+1)²`` square (kornia's, geodesic border).

    On brightfield H&E, erosion (a minimum filter) grows dark nuclei and dilation shrinks them.

    Shape:
        rgb ``(B,3,H,W)``, radius ``(B,)`` integer-valued -> ``(B,3,H,W)``.
    """
    def apply(x: torch.Tensor, r: int) -> torch.Tensor:
        # a flat square window is a separable max (dilation) or min (erosion) filter; the outside is
        # ignored (kornia's "geodesic" border), and max/min are exact
        y = _window_extreme(_window_extreme(x, abs(r), -1, r > 0), abs(r), -2, r > 0)
        return y

    return _grouped(rgb, radius.round().long(), apply)


def _window_extreme(x: torch.Tensor, radius: int, dim: int, largest: bool) -> torch.Tensor:
    """Max (or min) over the window ``[i - radius, i + radius]`` along ``dim``, outside ignored.

    By doubling: windows of 1, 2, 4, ... from pairwise maxima of shifted slices, then the
    ``2·radius + 1`` window from two overlapping power-of-two windows (a few elementwise passes).
    """
    pick = torch.maximum if largest else torch.minimum
    fill = float("-inf") if largest else float("inf")
    n, k = x.shape[dim], 2 * radius + 1
    pad = [0, 0] * (x.ndim - 1 - (dim % x.ndim)) + [radius, radius]
    current, width = F.pad(x, pad, value=fill), 1
    while 2 * width <= k:
        length = current.shape[dim] - width
        current = pick(current.narrow(dim, 0, length), current.narrow(dim, width, length))
        width *= 2
    return pick(current.narrow(dim, 0, n), current.narrow(dim, k - width, n))


def gaussian_blur(rgb: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-sample ``sigma`` in pixels (0 = unchanged; reflect border).

    Each sample's kernel has its own radius ``ceil(3·sigma)`` (kornia's kernel for that sigma), so a
    sample's blur does not depend on its batch companions; one grouped separable convolution.
    """
    sigma = sigma.to(rgb)
    active = sigma > 0
    if not bool(active.any()):
        return rgb.clone()
    b, c, h, w = rgb.shape
    radius = torch.ceil(3 * sigma).clamp(min=1)
    half = int(radius.max())
    x = torch.arange(-half, half + 1, dtype=rgb.dtype, device=rgb.device)
    kernel = torch.exp(-(x**2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2)) * (x.abs() <= radius[:, None])
    taps = (kernel / kernel.sum(-1, keepdim=True)).T.reshape(-1, b, 1, 1, 1)  # (K,B,1,1,1)
    padded = F.pad(rgb, (half, half, half, half), mode="reflect")
    # separable, as sums of shifted slices (cheaper than a depthwise convolution on the CPU)
    rows = padded[..., :, :w] * taps[0]
    for i in range(1, len(taps)):
        rows.addcmul_(padded[..., :, i : i + w], taps[i])
    out = rows[..., :h, :] * taps[0]
    for i in range(1, len(taps)):
        out.addcmul_(rows[..., i : i + h, :], taps[i])
    return out if bool(active.all()) else torch.where(_per_sample(active, rgb), out, rgb)


#: the order in which :func:`apply_augmentation_params` applies the keys present.
AUGMENTATION_ORDER: tuple[str, ...] = (
    "crop_scale", "dihedral", "morphology", "blur_sigma", "brightness", "contrast", "saturation", "hue",
    "gamma", "hed_shift",
)


def apply_augmentation_params(rgb: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Apply every transform whose key is in ``params``, in :data:`AUGMENTATION_ORDER`.

    Geometry first (crop, then flips/rotations), then morphology and blur, then colour, then the
    HED shift (with ``hed_scale`` too when given). Keys are those of :mod:`augment.params`.

    Shape:
        rgb ``(B,3,H,W)`` float in [0, 1]; each param ``(B, *shape)`` -> ``(B,3,H,W)``.

    Example:
        >>> x = torch.rand(2, 3, 8, 8)
        >>> y = apply_augmentation_params(x, {"dihedral": torch.tensor([0, 4])})
        >>> torch.equal(y[1], x[1].flip(-1))
        True
    """
    x = rgb
    for key in AUGMENTATION_ORDER:
        if key not in params:
            continue
        value = params[key]
        if key == "crop_scale":
            center = params.get("crop_center", torch.full((len(value), 2), 0.5))
            x = _on_active(x, value < 1, crop_resize, value, center)
        elif key == "hed_shift":
            scale = params.get("hed_scale", torch.ones_like(value))
            x = _on_active(x, (value != 0).any(-1) | (scale != 1).any(-1), _hed_scale_shift, value, scale)
        else:
            x = _on_active(x, value != PARAM_SCHEMA[key].identity, _SIMPLE[key], value)
    return x if x is not rgb else rgb.clone()


def _hed_scale_shift(rgb: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return hed_jitter(rgb, scale, shift)


def _on_active(x: torch.Tensor, active: torch.Tensor, fn, *values: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """``fn(x, *values)`` on the samples whose value is not the identity; the others are left as they are.

    Every transform here acts on each sample alone, so this gives each sample what the whole-batch
    call would (to float rounding), and skips the work (HSV, blur, resampling) on the rest.
    """
    active = active.to(x.device)
    if not bool(active.any()):
        return x
    if bool(active.all()):
        return fn(x, *values)
    index = active.nonzero().flatten()
    out = x.clone()
    out[index] = fn(x[index], *(v[index.to(v.device)] for v in values))
    return out


_SIMPLE = {
    "dihedral": dihedral, "morphology": morphology, "blur_sigma": gaussian_blur, "brightness": adjust_brightness,
    "contrast": adjust_contrast, "saturation": adjust_saturation, "hue": adjust_hue, "gamma": adjust_gamma,
}
