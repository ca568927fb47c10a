"""The geometric part of the HistAug transform family: flips/rotations and crops, and their pixel maps.

Images, masks and label maps ``(B,C,H,W)``; parameters follow :mod:`augment.params`. The same
per-sample crop and dihedral element are also returned as ``(B,3,3)`` pixel maps (kornia's
convention: ``(x, y)``, pixel centres at integers), so kornia moves masks, boxes and keypoints
with the image and can invert it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = value.to(like.device) if value.dtype == torch.bool else value.to(like)
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def _grouped(rgb: torch.Tensor, keys: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001 - fn(subset, key)
    """Apply ``fn(rgb[keys == k], k)`` for every distinct non-zero ``k``; zeros pass through."""
    distinct = keys.unique().tolist()
    if len(distinct) == 1:  # one value for the whole batch (always so for one image): no indexing
        return fn(rgb, int(distinct[0])) if distinct[0] != 0 else rgb.clone()
    out = rgb.clone()
    for k in distinct:
        if k != 0:
            idx = (keys == k).nonzero().flatten().to(rgb.device)
            out[idx] = fn(rgb[idx], int(k))
    return out


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

    Bilinear (or nearest) sampling with corners aligned, as kornia's ``crop_and_resize``, through
    one ``affine_grid`` / ``grid_sample``; ``scale == 1`` leaves a sample unchanged. The pixel map is
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
    h, w = rgb.shape[-2:]
    scale, center = scale.to(rgb), center.to(rgb)
    active = scale < 1
    if not bool(active.any()):
        return rgb.clone()
    x0, y0, side = _crop_box(scale, center, (h, w))
    # output pixel j samples x0 + j·(side - 1)/(w - 1) (corners aligned); in grid_sample's [-1, 1]
    # units the grid is separable: x from the column, y from the row
    dtype = rgb.dtype if rgb.is_floating_point() else torch.float32
    step = (side - 1).to(dtype)[:, None]

    def axis(start: torch.Tensor, n: int) -> torch.Tensor:
        pixels = start.to(dtype)[:, None] + torch.linspace(0, 1, n, dtype=dtype, device=rgb.device) * step
        return pixels * (2 / (n - 1)) - 1

    gx, gy = axis(x0, w), axis(y0, h)
    b = rgb.shape[0]
    grid = torch.stack([gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)], -1)
    source = rgb if rgb.is_floating_point() else rgb.to(dtype)
    cropped = F.grid_sample(source, grid, mode=mode, padding_mode="zeros", align_corners=True).to(rgb.dtype)
    if clamp:
        cropped = cropped.clamp(0.0, 1.0)
    return cropped if bool(active.all()) else torch.where(_per_sample(active, rgb), cropped, rgb)


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
    active = scale < 1
    one, zero = torch.ones_like(scale), torch.zeros_like(scale)
    sx = torch.where(active, (w - 1) / (side - 1), one)
    sy = torch.where(active, (h - 1) / (side - 1), one)
    tx, ty = torch.where(active, -x0 * sx, zero), torch.where(active, -y0 * sy, zero)
    return torch.stack([sx, zero, tx, zero, sy, ty, zero, zero, one], -1).reshape(-1, 3, 3)


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
    return _dihedral_elements(tuple(size))[k.cpu()].to(device=k.device)


@functools.lru_cache(maxsize=64)
def _dihedral_elements(size: tuple[int, int]) -> torch.Tensor:
    """Build the 8 pixel maps ``(8,3,3)`` float32 of :func:`dihedral_matrix` for one image size (cached)."""
    elements = []
    for v in range(8):
        m, (h, w) = torch.eye(3, dtype=torch.float64), size
        for _ in range(v % 4):
            m = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ m
            h, w = w, h
        if v >= 4:
            m = torch.tensor([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ m
        elements.append(m)
    return torch.stack(elements).float()


def geometric_matrix(params: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Return the ``(B,3,3)`` pixel map of the geometric keys of ``params`` (crop, then dihedral), as applied.

    It is what kornia needs to move masks, boxes and keypoints with the image, and to invert.

    Example:
        >>> geometric_matrix({"dihedral": torch.tensor([0.0])}, (4, 4))[0].equal(torch.eye(3))
        True
    """
    n = len(next(iter(params.values())))
    m = torch.eye(3).repeat(n, 1, 1)
    if "crop_scale" in params and bool((params["crop_scale"] < 1).any()):  # else identity
        scale = params["crop_scale"].float()
        center = params.get("crop_center", torch.full((n, 2), 0.5)).float()
        m = crop_resize_matrix(scale.cpu(), center.cpu(), size) @ m
    if "dihedral" in params and bool((params["dihedral"].round() != 0).any()):  # else identity
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
