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


# -- the HistAug transform family (colour, morphology, blur, geometry) ---------------------------


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = value.to(like.device) if value.dtype == torch.bool else value.to(like)
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def adjust_brightness(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply RGB by ``factor`` per sample (torchvision's brightness), clamped to [0, 1].

    Shape:
        rgb ``(B,3,H,W)``, factor ``(B,)`` -> ``(B,3,H,W)``.
    """
    return (rgb * _per_sample(factor, rgb)).clamp(0.0, 1.0)


def adjust_contrast(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with each image's grey mean (torchvision's contrast; kornia's implementation)."""
    from kornia.enhance import adjust_contrast_with_mean_subtraction

    return adjust_contrast_with_mean_subtraction(rgb, factor.to(rgb))


def adjust_saturation(rgb: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scale HSV saturation per sample (kornia)."""
    from kornia.enhance import adjust_saturation as _adjust

    return _adjust(rgb, factor.to(rgb)).clamp(0.0, 1.0)


def adjust_hue(rgb: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``turns`` of a full circle per sample (kornia works in radians)."""
    from kornia.enhance import adjust_hue as _adjust

    return _adjust(rgb, turns.to(rgb) * 2 * torch.pi).clamp(0.0, 1.0)


def adjust_gamma(rgb: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``rgb ** gamma`` per sample (kornia)."""
    from kornia.enhance import adjust_gamma as _adjust

    return _adjust(rgb, gamma.to(rgb))


def _grouped(rgb: torch.Tensor, keys: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001 - fn(subset, key)
    """Apply ``fn(rgb[keys == k], k)`` for every distinct non-zero ``k``; zeros pass through."""
    out = rgb.clone()
    for k in keys.unique().tolist():
        if k != 0:
            idx = (keys == k).nonzero().flatten().to(rgb.device)
            out[idx] = fn(rgb[idx], int(k))
    return out


def morphology(rgb: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Grey-scale erosion (``radius < 0``) or dilation (``> 0``) with a ``(2r+1)²`` square (kornia).

    On brightfield H&E, erosion (a minimum filter) grows dark nuclei and dilation shrinks them.

    Shape:
        rgb ``(B,3,H,W)``, radius ``(B,)`` integer-valued -> ``(B,3,H,W)``.
    """
    from kornia.morphology import dilation, erosion

    def apply(x: torch.Tensor, r: int) -> torch.Tensor:
        kernel = torch.ones(2 * abs(r) + 1, 2 * abs(r) + 1, device=x.device, dtype=x.dtype)
        return (dilation if r > 0 else erosion)(x, kernel, border_type="geodesic")

    return _grouped(rgb, radius.round().long(), apply)


def gaussian_blur(rgb: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-sample ``sigma`` in pixels (0 = unchanged; kornia, reflect border)."""
    from kornia.filters import gaussian_blur2d

    sigma = sigma.to(rgb)
    active = sigma > 0
    if not bool(active.any()):
        return rgb.clone()
    half = max(1, int(torch.ceil(3 * sigma.max())))
    blurred = gaussian_blur2d(rgb, (2 * half + 1, 2 * half + 1), sigma.clamp(min=1e-3)[:, None].expand(-1, 2))
    return torch.where(_per_sample(active, rgb), blurred, rgb)


def dihedral(rgb: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One of the 8 symmetries of the square: ``k % 4`` quarter turns, then a horizontal flip if ``k >= 4``.

    Raises:
        ValueError: non-square images with an odd number of quarter turns.
    """
    k = k.round().long()
    if rgb.shape[-1] != rgb.shape[-2] and bool((k % 2 == 1).any()):
        raise ValueError(f"dihedral: quarter turns need square images, got {tuple(rgb.shape[-2:])}")

    def apply(x: torch.Tensor, v: int) -> torch.Tensor:
        x = torch.rot90(x, v % 4, dims=(-2, -1))
        return x.flip(-1) if v >= 4 else x

    return _grouped(rgb, k, apply)


def crop_resize(
    rgb: torch.Tensor, scale: torch.Tensor, center: torch.Tensor, mode: str = "bilinear", clamp: bool = True
) -> torch.Tensor:
    """Crop a square of side ``scale · min(H, W)`` at ``center`` (y, x in [0, 1] of the free room) and resize back.

    Uses kornia's ``crop_and_resize``; ``scale == 1`` leaves a sample unchanged. The pixel map is
    :func:`crop_resize_matrix`.

    Args:
        rgb: images ``(B,C,H,W)`` (any channel count, e.g. a mask).
        scale: crop side as a share of the shorter side, ``(B,)``.
        center: crop position ``(B,2)``.
        mode: ``"bilinear"`` for images, ``"nearest"`` for masks and label maps.
        clamp: clamp the result to [0, 1] (images); off for masks with other values.

    Shape:
        rgb ``(B,C,H,W)``, scale ``(B,)``, center ``(B,2)`` -> ``(B,C,H,W)``.
    """
    from kornia.geometry.transform import crop_and_resize

    h, w = rgb.shape[-2:]
    scale, center = scale.to(rgb), center.to(rgb)
    active = scale < 1
    if not bool(active.any()):
        return rgb.clone()
    x0, y0, side = _crop_box(scale, center, (h, w))
    y1, x1 = y0 + side - 1, x0 + side - 1
    boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1),
                         torch.stack([x0, y1], -1)], 1)  # (B,4,2) x,y clockwise from top-left
    cropped = crop_and_resize(rgb, boxes, (h, w), mode=mode, align_corners=True)
    if clamp:
        cropped = cropped.clamp(0.0, 1.0)
    return torch.where(_per_sample(active, rgb), cropped, rgb)


# -- the geometric part as 3x3 pixel maps (kornia convention: (x, y), pixel centres at integers) ---


def _crop_box(scale: torch.Tensor, center: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    h, w = size
    side = scale * min(h, w)
    return center[:, 1] * (w - side), center[:, 0] * (h - side), side


def crop_resize_matrix(scale: torch.Tensor, center: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return the ``(B,3,3)`` map from input to output pixel coordinates ``(x, y, 1)`` of :func:`crop_resize`.

    Identity where ``scale >= 1`` (those samples are left unchanged).

    Example:
        >>> m = crop_resize_matrix(torch.tensor([0.6]), torch.tensor([[0.0, 0.0]]), (5, 5))
        >>> (m[0] @ torch.tensor([2.0, 2.0, 1.0])).tolist()  # the crop's corner goes to the image's corner
        [4.0, 4.0, 1.0]
    """
    h, w = size
    dtype = scale.dtype if scale.is_floating_point() else torch.float32
    scale, center = scale.to(dtype), center.to(dtype)
    x0, y0, side = _crop_box(scale, center, size)
    sx, sy = (w - 1) / (side - 1), (h - 1) / (side - 1)
    m = torch.eye(3, dtype=dtype, device=scale.device).repeat(len(scale), 1, 1)
    m[:, 0, 0], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2] = sx, -x0 * sx, sy, -y0 * sy
    return torch.where((scale < 1)[:, None, None], m, torch.eye(3, dtype=dtype, device=scale.device))


def dihedral_matrix(k: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Return the ``(B,3,3)`` map from input to output pixel coordinates ``(x, y, 1)`` of :func:`dihedral`.

    A quarter turn (``torch.rot90``) sends ``(x, y)`` to ``(y, W-1-x)``; the flip sends ``x`` to ``W-1-x``.

    Raises:
        ValueError: non-square ``size`` with an odd number of quarter turns.

    Example:
        >>> dihedral_matrix(torch.tensor([4]), (3, 3))[0].tolist()  # horizontal flip
        [[-1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    k = k.round().long()
    if size[0] != size[1] and bool((k % 2 == 1).any()):
        raise ValueError(f"dihedral: quarter turns need square images, got {tuple(size)}")
    elements = []
    for v in range(8):
        m, (h, w) = torch.eye(3, dtype=torch.float64), size
        for _ in range(v % 4):
            m = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ m
            h, w = w, h
        if v >= 4:
            m = torch.tensor([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ m
        elements.append(m)
    return torch.stack(elements)[k.cpu()].to(device=k.device, dtype=torch.float32)


def geometric_matrix(params: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Return the ``(B,3,3)`` pixel map of the geometric keys of ``params`` (crop, then dihedral), as applied.

    It is what kornia needs to move masks, boxes and keypoints with the image, and to invert.

    Example:
        >>> geometric_matrix({"dihedral": torch.tensor([0.0])}, (4, 4))[0].equal(torch.eye(3))
        True
    """
    n = len(next(iter(params.values())))
    m = torch.eye(3).repeat(n, 1, 1)
    if "crop_scale" in params:
        scale = params["crop_scale"].float()
        center = params.get("crop_center", torch.full((n, 2), 0.5)).float()
        m = crop_resize_matrix(scale.cpu(), center.cpu(), size) @ m
    if "dihedral" in params:
        m = dihedral_matrix(params["dihedral"].cpu(), size) @ m
    return m


def apply_geometric_params(x: torch.Tensor, params: dict[str, torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Only the geometric keys of ``params`` (crop, then dihedral), for masks and label maps.

    Any channel count and value range: nothing is clamped, colour keys are ignored, and ``mode``
    (``"nearest"`` by default) keeps label values exact.

    Shape:
        x ``(B,C,H,W)`` float -> ``(B,C,H,W)``.

    Example:
        >>> mask = torch.zeros(1, 1, 4, 4)
        >>> mask[0, 0, 0, 0] = 7.0
        >>> apply_geometric_params(mask, {"dihedral": torch.tensor([4]), "hue": torch.tensor([0.3])})[0, 0, 0]
        tensor([0., 0., 0., 7.])
    """
    out = x
    if "crop_scale" in params:
        center = params.get("crop_center", torch.full((len(params["crop_scale"]), 2), 0.5))
        out = crop_resize(out, params["crop_scale"], center, mode=mode, clamp=False)
    if "dihedral" in params:
        out = dihedral(out, params["dihedral"])
    return out if out is not x else x.clone()


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
            x = crop_resize(x, value, params.get("crop_center", torch.full((len(value), 2), 0.5)))
        elif key == "hed_shift":
            scale = params.get("hed_scale", torch.ones_like(value))
            x = hed_jitter(x, scale, value)
        else:
            x = _SIMPLE[key](x, value)
    return x if x is not rgb else rgb.clone()


_SIMPLE = {
    "dihedral": dihedral, "morphology": morphology, "blur_sigma": gaussian_blur, "brightness": adjust_brightness,
    "contrast": adjust_contrast, "saturation": adjust_saturation, "hue": adjust_hue, "gamma": adjust_gamma,
}
