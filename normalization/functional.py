"""Stain physics as pure, batched torch functions.

Every function here is non-mutating and works on a whole batch at once: no Python loop over
tiles. Conventions:

* RGB images are float in [0, 1], ``(B,3,H,W)``.
* Optical density (Beer–Lambert) uses a background intensity ``io`` on the 0–255 scale and a
  +1 offset so that black pixels stay finite: ``od = -log((255·rgb + 1) / io)``. The inverse
  :func:`od_to_rgb` undoes it exactly. The offset and ``io=240`` match torchstain and Macenko's
  paper, so stain vectors agree with torchstain's.
* Stain matrices are ``(B,3,2)``: unit OD vectors of haematoxylin (column 0) and eosin (column 1).
* Pixel sets for estimation are ``(B,N,3)`` OD rows with a ``(B,N)`` boolean mask, so tiles with
  different amounts of tissue share one tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genpath.utils.quiet_imports import import_kornia
from normalization.fastmath import inverse_2x2, largest_eigenvalue_2x2, masked_quantile, pinv_stains


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Convert RGB to CIE-LAB with kornia (imported on first use: a slide run through libvips never needs it)."""
    return import_kornia().color.rgb_to_lab(rgb)


def lab_to_rgb(lab: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Convert CIE-LAB to RGB with kornia (imported on first use)."""
    return import_kornia().color.lab_to_rgb(lab, clip=clip)


#: Reference H and E OD vectors (columns) and 99th-percentile concentrations, from torchstain /
#: Macenko et al. 2009. Used to tell H from E and as a fallback target.
REFERENCE_STAINS = torch.tensor([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONCENTRATIONS = torch.tensor([1.9705, 1.0308])


def rgb_to_od(rgb: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """Convert RGB in [0, 1] to optical density by Beer–Lambert.

    Args:
        rgb: float RGB values in [0, 1], any shape.
        io: background (incident light) intensity on the 0–255 scale.

    Returns:
        Optical density, same shape; ``-log((255·rgb + 1) / io)``.

    Example:
        >>> rgb_to_od(torch.tensor([239 / 255]), io=240.0)
        tensor([-0.])
    """
    if torch.is_grad_enabled() and rgb.requires_grad:
        return -torch.log((rgb * 255.0 + 1.0) / io)
    return (rgb * 255.0).add_(1.0).div_(io).log_().neg_()  # same maths, no temporaries


def od_to_rgb(od: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """Convert optical density back to RGB in [0, 1]; the exact inverse of :func:`rgb_to_od`.

    Values are clamped to [0, 1] (OD below ``-log(256/io)`` is brighter than white).

    Example:
        >>> x = torch.rand(3, 4, 4)
        >>> torch.allclose(od_to_rgb(rgb_to_od(x)), x, atol=1e-5)
        True
    """
    if torch.is_grad_enabled() and od.requires_grad:
        return ((io * torch.exp(-od) - 1.0) / 255.0).clamp(0.0, 1.0)
    return torch.exp(-od).mul_(io).sub_(1.0).div_(255.0).clamp_(0.0, 1.0)


def tissue_mask_od(od: torch.Tensor, beta: float = 0.15, od_max: float = 3.0, dim: int = -3) -> torch.Tensor:
    """Tissue pixels: every channel's OD at least ``beta`` and the mean OD at most ``od_max``.

    Low OD is background glass; a very high mean OD is black or saturated (pen marks, folds,
    dust). The upper bound is on the mean so that dark nuclei, which saturate one channel in
    JPEG-compressed scans, stay in: dropping them biases the haematoxylin vector.

    Shape:
        od ``(B,3,H,W)`` -> mask ``(B,H,W)``; with ``dim=-1``, pixels ``(B,N,3)`` -> ``(B,N)``.
    """
    return (od.amin(dim=dim) >= beta) & (od.mean(dim=dim) <= od_max)  # amin: a vectorised (od >= beta).all


def sample_pixels(image: torch.Tensor, max_pixels: int = 16384) -> torch.Tensor:
    """Take a fixed strided subset of pixels for estimation.

    The flat step is made coprime with the width so the subset is a lattice that covers every
    row and column. It depends only on the tile's own size, so estimates are deterministic and
    independent of batch companions. The pixels are stored channel-first (a transposed view of
    a contiguous ``(B,C,N)``), so per-channel maps and reductions over channels run on contiguous rows.

    Shape:
        image ``(B,C,H,W)`` -> pixels ``(B,N,C)`` with ``N <= max_pixels``.
    """
    b, c, h, w = image.shape
    step = max(1, -(-h * w // max_pixels))
    while step > 1 and math.gcd(step, w) != 1:  # coprime with the width: a lattice, not a few columns
        step += 1
    return image.reshape(b, c, h * w)[:, :, ::step].contiguous().transpose(1, 2)


def concentration_percentiles(
    concentrations: torch.Tensor, mask: torch.Tensor, percentile: float = 99.0
) -> torch.Tensor:
    """Per-tile ``percentile`` of each stain's concentration over masked pixels.

    Shape:
        concentrations ``(B,2,N)``, mask ``(B,N)`` -> ``(B,2)``.
    """
    return masked_quantile(concentrations, mask.unsqueeze(1), percentile / 100.0)


def masked_covariance(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Covariance of the masked rows of each batch item.

    Shape:
        pixels ``(B,N,C)``, mask ``(B,N)`` -> ``(B,C,C)``.
    """
    weight = mask.to(pixels.dtype).unsqueeze(1)  # (B,1,N)
    count = weight.sum(dim=-1, keepdim=True).clamp(min=2.0)  # (B,1,1)
    kept = pixels.transpose(1, 2) * weight  # (B,C,N), rows contiguous for channel-first samples
    mean = kept.sum(dim=-1, keepdim=True) / count  # (B,C,1)
    centred = torch.addcmul(kept, mean, weight, value=-1.0)  # (x - mean)·w, as w is 0 or 1
    return centred @ centred.transpose(1, 2) / (count - 1.0)


def od_plane_validity(
    eigenvalues: torch.Tensor, min_variance: float = 1e-4, max_residual: float = 0.25
) -> torch.Tensor:
    """Whether tissue OD has two-stain structure, from its covariance eigenvalues (ascending).

    Invalid when the second eigenvalue is below ``min_variance`` (one colour) or when more than
    ``max_residual`` of the variance lies off the main plane (noise, not two stains).

    Shape:
        eigenvalues ``(B,3)`` -> ``(B,)`` bool.
    """
    total = eigenvalues.clamp(min=0).sum(-1)
    return (eigenvalues[..., 1] > min_variance) & (eigenvalues[..., 0].clamp(min=0) <= max_residual * total)


def od_eigen(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(B,3)`` (ascending) and eigenvectors ``(B,3,3)`` of the masked OD covariance."""
    cov = masked_covariance(pixels, mask)
    return torch.linalg.eigh(cov + 1e-9 * torch.eye(3, dtype=cov.dtype, device=cov.device))


def order_stains(
    first: torch.Tensor, second: torch.Tensor, reference: torch.Tensor = REFERENCE_STAINS
) -> torch.Tensor:
    """Assign two unit stain vectors to H and E by cosine similarity to reference vectors.

    Shape:
        first, second ``(B,3)`` -> stain matrix ``(B,3,2)`` (H, E columns).
    """
    ref = F.normalize(reference.to(first), dim=0)
    keep = (first @ ref[:, 0] + second @ ref[:, 1]) >= (first @ ref[:, 1] + second @ ref[:, 0])
    h = torch.where(keep.unsqueeze(-1), first, second)
    e = torch.where(keep.unsqueeze(-1), second, first)
    return torch.stack([h, e], dim=-1)


def stain_matrix_validity(
    stains: torch.Tensor, min_angle_deg: float = 3.0, min_component: float = -0.05
) -> torch.Tensor:
    """Physical plausibility of estimated stain vectors: non-negative OD and distinct directions.

    Shape:
        stains ``(B,3,2)`` -> ``(B,)`` bool.
    """
    finite = torch.isfinite(stains).flatten(1).all(dim=1)
    nonneg = (stains.nan_to_num(-1.0) >= min_component).flatten(1).all(dim=1)
    cos = (F.normalize(stains[..., 0], dim=-1) * F.normalize(stains[..., 1], dim=-1)).sum(-1)
    distinct = cos < torch.cos(torch.deg2rad(torch.tensor(min_angle_deg)))
    return finite & nonneg & distinct


def macenko_stain_matrix(
    pixels: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 1.0,
    min_variance: float = 1e-4,
    max_residual: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate H&E stain vectors by Macenko's method, for every tile at once.

    The OD of tissue pixels is projected on the plane of its two main principal axes; the
    ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane give the stain vectors.

    Args:
        pixels: OD rows of each tile.
        mask: which rows are tissue.
        alpha: angle percentile (in percent).
        min_variance: the plane's second eigenvalue below this means a single colour: invalid.
        max_residual: share of OD variance off the plane above this means no two-stain
            structure (noise): invalid.

    Returns:
        ``(stains, valid)``: ``(B,3,2)`` unit vectors ordered (H, E) and a ``(B,)`` validity mask.
        Invalid tiles get the reference matrix so downstream maths stays finite.

    Example:
        >>> od = torch.rand(2, 100, 3)
        >>> stains, valid = macenko_stain_matrix(od, torch.ones(2, 100, dtype=torch.bool))
        >>> stains.shape
        torch.Size([2, 3, 2])
    """
    eigvals, eigvecs = od_eigen(pixels, mask)
    # eigh sorts ascending; columns 2 and 1 span the stain plane. Point the main axis into
    # positive OD so projected angles stay inside (-pi/2, pi/2) without wrapping.
    main = eigvecs[..., 2] * torch.where(eigvecs[..., 2].sum(-1, keepdim=True) < 0, -1.0, 1.0)
    second = eigvecs[..., 1]
    plane = torch.stack([main, second], dim=-1)
    projected = plane.transpose(1, 2) @ pixels.transpose(1, 2)  # (B,2,N): contiguous rows for atan2
    phi = torch.atan2(projected[:, 1], projected[:, 0])
    phi_lo, phi_hi = masked_quantile(phi, mask, (alpha / 100.0, 1.0 - alpha / 100.0)).unbind(-1)
    v_lo = plane @ torch.stack([torch.cos(phi_lo), torch.sin(phi_lo)], dim=-1).unsqueeze(-1)
    v_hi = plane @ torch.stack([torch.cos(phi_hi), torch.sin(phi_hi)], dim=-1).unsqueeze(-1)
    stains = order_stains(v_lo.squeeze(-1), v_hi.squeeze(-1))
    valid = od_plane_validity(eigvals, min_variance, max_residual) & stain_matrix_validity(stains)
    fallback = REFERENCE_STAINS.to(stains).expand_as(stains)
    stains = F.normalize(torch.where(valid[:, None, None], stains, fallback), dim=1)
    return stains, valid


def concentrations_lstsq(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations, ``pinv(S) · od``, per tile.

    Shape:
        od ``(B,3,...)``, stains ``(B,3,2)`` -> ``(B,2,...)``.
    """
    b = od.shape[0]
    flat = od.reshape(b, 3, -1)
    return (pinv_stains(stains) @ flat).reshape(b, 2, *od.shape[2:])


def concentrations_nonneg(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Non-negative least-squares concentrations for two stains, in closed form per pixel.

    With two stains, NNLS has three candidate solutions: the unconstrained one (when it is
    non-negative) or one stain alone; the feasible candidate with the lowest residual wins.

    Shape:
        od ``(B,3,...)``, stains ``(B,3,2)`` -> ``(B,2,...)``.
    """
    b = od.shape[0]
    flat = od.reshape(b, 3, -1)
    free = pinv_stains(stains) @ flat
    norms = (stains * stains).sum(1).clamp(min=1e-12).unsqueeze(-1)  # (B,2,1)
    single = (stains.transpose(1, 2) @ flat).div_(norms).clamp_(min=0)  # (B,2,N): each stain alone
    # one stain alone at c = max(0, s·y)/|s|² leaves |y|² - c²|s|²: keep the stain with the larger c²|s|²
    # (H on ties), the same choice as comparing the two residuals
    gain = single * single * norms
    keep_h = torch.ge(gain[:, :1], gain[:, 1:], out=torch.empty_like(gain[:, :1]))  # 0/1 floats
    single.mul_(torch.cat([keep_h, 1.0 - keep_h], 1))
    feasible = torch.ge(free.amin(1, keepdim=True), 0.0, out=keep_h)
    return torch.lerp(single, free, feasible).reshape(b, 2, *od.shape[2:])  # exact at 0 and 1


def render_od(concentrations: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Beer–Lambert mixing: ``od = S · c``.

    Shape:
        concentrations ``(B,2,...)``, stains ``(B,3,2)`` -> ``(B,3,...)``.
    """
    b = concentrations.shape[0]
    flat = concentrations.reshape(b, 2, -1)
    return (stains @ flat).reshape(b, 3, *concentrations.shape[2:])


def vahadane_stain_matrix(
    pixels: torch.Tensor,
    mask: torch.Tensor,
    init: torch.Tensor,
    sparsity: float = 0.1,
    n_iter: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative factorisation ``OD ≈ S·C`` (Vahadane et al. 2016), batched.

    Alternates one proximal-gradient (ISTA) step on the concentrations with an L1 penalty
    ``sparsity`` and a non-negative least-squares update of the unit-norm stain vectors.
    Replaces the SPAMS dictionary learning that staintools uses (SPAMS is not installable).

    Args:
        pixels: OD rows ``(B,N,3)``.
        mask: tissue rows ``(B,N)``.
        init: initial stain matrices ``(B,3,2)`` (e.g. from :func:`macenko_stain_matrix`).
        sparsity: L1 weight on concentrations (SPAMS' ``lambda1``).
        n_iter: alternations.

    Returns:
        ``(stains, valid)`` as in :func:`macenko_stain_matrix`.
    """
    od = pixels.transpose(1, 2) * mask.unsqueeze(1).to(pixels.dtype)  # (B,3,N)
    stains = init.clone()
    conc = concentrations_lstsq(od, stains).clamp(min=0)
    eye = 1e-6 * torch.eye(2, dtype=od.dtype, device=od.device)
    for _ in range(n_iter):
        gram = stains.transpose(1, 2) @ stains  # (B,2,2)
        lipschitz = largest_eigenvalue_2x2(gram).clamp(min=1e-6)[:, None, None]
        grad = torch.baddbmm(gram @ conc, stains.transpose(1, 2), od, alpha=-1.0)  # S'S·C - S'·od
        conc = conc.sub_(grad.add_(sparsity).div_(lipschitz)).clamp_(min=0)
        hht = conc @ conc.transpose(1, 2)
        # a ridge relative to the Gram's scale: a fixed 1e-6 vanishes in float32 next to large
        # concentrations, leaving a singular matrix when one stain is absent (binary tiles)
        hht = hht + eye * hht.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1.0)[:, None, None]
        stains = (od @ conc.transpose(1, 2)) @ inverse_2x2(hht)
        stains = F.normalize(stains.clamp(min=0), dim=1)
    stains = order_stains(stains[..., 0], stains[..., 1])
    valid = stain_matrix_validity(stains)
    stains = torch.where(valid[:, None, None], stains, init)
    return stains, valid


def stain_transfer_matrix(
    source_stains: torch.Tensor,
    source_max: torch.Tensor,
    target_stains: torch.Tensor,
    target_max: torch.Tensor,
) -> torch.Tensor:
    """Build the 3×3 OD map of Macenko normalization: ``S_t · diag(m_t / m_s) · pinv(S_s)``.

    Shape:
        source_stains, target_stains ``(B,3,2)``; source_max, target_max ``(B,2)`` -> ``(B,3,3)``.
    """
    scale = (target_max / source_max.clamp(min=1e-6)).unsqueeze(-1)
    return target_stains @ (scale * pinv_stains(source_stains))


def apply_od_map(rgb: torch.Tensor, matrix: torch.Tensor, io: float = 240.0) -> torch.Tensor:
    """Apply a per-tile linear map in OD space: ``od_to_rgb(M · rgb_to_od(rgb))``.

    Shape:
        rgb ``(B,3,H,W)``, matrix ``(B,3,3)`` -> ``(B,3,H,W)``.
    """
    b, _, h, w = rgb.shape
    flat, m = rgb.reshape(b, 3, h * w), matrix.to(rgb)
    # io·exp(-M·od) = exp(log(io)·(1 - M·1) + M·log(255·rgb + 1)); 1/255 folded into the exponent
    bias = math.log(io) * (1.0 - m.sum(-1, keepdim=True)) - math.log(255.0)
    out = torch.empty_like(flat)
    step = max(1, 131072 // (h * w)) if rgb.device.type == "cpu" else b  # cache-sized chunks of tiles
    for i in range(0, b, step):
        part = torch.baddbmm(bias[i : i + step], m[i : i + step], flat[i : i + step].mul(255.0).log1p_())
        out[i : i + step] = part.exp_().sub_(1.0 / 255.0).clamp_(0.0, 1.0)
    return out.reshape(b, 3, h, w)


def lab_statistics(
    rgb: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile mean and standard deviation of CIE-LAB channels (kornia's conversion).

    Args:
        rgb: ``(B,3,H,W)`` in [0, 1].
        mask: optional ``(B,H,W)`` pixels to include; all pixels when None.

    Returns:
        ``(mean, std)``, each ``(B,3)``; std is floored at 1e-3.
    """
    lab = rgb_to_lab(rgb).flatten(2)
    weight = torch.ones_like(lab[:, :1]) if mask is None else mask.flatten(1)[:, None].to(lab)
    count = weight.sum(-1).clamp(min=1.0)
    mean = (lab * weight).sum(-1) / count
    var = (((lab - mean.unsqueeze(-1)) ** 2) * weight).sum(-1) / count
    return mean, var.sqrt().clamp(min=1e-3)


def reinhard_transfer(
    rgb: torch.Tensor,
    source_mean: torch.Tensor,
    source_std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
) -> torch.Tensor:
    """Reinhard colour transfer: a per-tile affine map of each LAB channel.

    Shape:
        rgb ``(B,3,H,W)``; statistics ``(B,3)`` -> ``(B,3,H,W)``.
    """
    lab = rgb_to_lab(rgb)
    scale = (target_std / source_std)[..., None, None]
    lab = (lab - source_mean[..., None, None]) * scale + target_mean[..., None, None]
    lab = torch.cat([lab[:, :1].clamp(0.0, 100.0), lab[:, 1:]], dim=1)
    return lab_to_rgb(lab, clip=True)
