"""Losses of the one-step H&E→IHC translator, written from the papers' descriptions.

* :func:`patch_nce_loss`: PatchNCE (Park et al., CUT, 2020): an InfoNCE loss over patch
  features; the query is a patch of the output, its positive is the feature at the *same*
  location of another image, its negatives are the other sampled locations of that image.
* :func:`asp_weights`: the adaptive weights of the Adaptive Supervised PatchNCE loss (Li et al.,
  ASP, MICCAI 2023). Consecutive-section pairs are never pixel-aligned, so a supervised PatchNCE
  between the output and the real IHC is trusted less where the pair disagrees: each patch is
  weighted by a lookup of its positive similarity, blended with uniform weights by a schedule
  that starts uniform (``p = 1``) and moves to the lookup as training goes on.
* :func:`gaussian_pyramid_l1`: the multi-scale L1 of BCI's PyramidPix2pix (Liu et al., 2022):
  L1 between Gaussian-pyramid levels, so coarse colour/intensity must match while fine
  misaligned detail is forgiven.
* :func:`lsgan_loss`: least-squares GAN loss (Mao et al., 2017), as CUT and ASP use.

All are pure functions of tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCHEDULES = ("lambda", "linear", "sigmoid", "zero")
LOOKUPS = ("linear", "top", "bell", "uniform")


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Per-patch InfoNCE loss between matching patch features of two images.

    Args:
        query: ``(B,N,D)`` L2-normalized features of N sampled patches per image (the output).
        key: ``(B,N,D)`` features at the same N locations of the other image (detached here:
            the key is the target, not trained through this loss).
        temperature: softmax temperature (0.07 as in CUT).

    Returns:
        ``(B*N,)`` losses; negatives are the other N−1 locations of the same image.

    Shape:
        ``(B,N,D), (B,N,D) -> (B*N,)``

    Example:
        >>> q = F.normalize(torch.randn(2, 8, 16), dim=-1)
        >>> bool(patch_nce_loss(q, q).mean() < patch_nce_loss(q, q.roll(1, 1)).mean())
        True
    """
    if query.shape != key.shape or query.ndim != 3:
        raise ValueError(f"query, key: expected equal (B,N,D) shapes, got {tuple(query.shape)} and {tuple(key.shape)}")
    key = key.detach()
    b, n, _ = query.shape
    logits = torch.bmm(query, key.transpose(1, 2)) / temperature  # (B,N,N): diagonal = positives
    return F.cross_entropy(logits.reshape(b * n, n), torch.arange(n, device=query.device).repeat(b), reduction="none")


def positive_similarity(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each query with its positive key, ``(B,N,D) -> (B*N,)`` (no gradient)."""
    return (query.detach() * key.detach()).sum(-1).reshape(-1)


def asp_schedule(progress: float, schedule: str = "lambda", decay_start: float = 0.5) -> float:
    """Share ``p`` of uniform weighting at a point of training (1 = all uniform).

    Args:
        progress: training progress in [0, 1] (step / max_steps).
        schedule: ``"lambda"`` (1 until ``decay_start``, then linear to 0: ASP's default,
            matching a constant-then-decaying learning rate), ``"linear"`` (1 → 0),
            ``"sigmoid"`` (smooth 1 → 0 around the middle) or ``"zero"`` (always uniform: plain
            supervised PatchNCE).
        decay_start: where ``"lambda"`` starts to decay.

    Example:
        >>> asp_schedule(0.25), asp_schedule(0.75), asp_schedule(1.0, "linear")
        (1.0, 0.5, 0.0)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= decay_start < 1.0:
        raise ValueError(f"decay_start: expected a value in [0, 1), got {decay_start}")
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "sigmoid":
        return 1.0 / (1.0 + math.exp((t - 0.5) * 10.0))
    if schedule == "lambda":
        return 1.0 if t < decay_start else (1.0 - t) / (1.0 - decay_start)
    return 1.0


def asp_weights(similarity: torch.Tensor, progress: float, schedule: str = "lambda", lookup: str = "linear",
                decay_start: float = 0.5) -> torch.Tensor:
    """Adaptive per-patch weights of the ASP loss, normalized to mean 1.

    ``w = p·1 + (1 − p)·lookup(s)`` with ``p = asp_schedule(progress)`` and ``s`` the positive
    cosine similarity of each patch. Lookups: ``"linear"`` ``max(s, 0)``, ``"top"`` the upper
    quarter circle ``sqrt(1 − (max(s,0) − 1)²)`` (steep near 0, flat near 1), ``"bell"`` a
    Gaussian around 0.5 (down-weights both disagreeing and trivially easy patches),
    ``"uniform"`` 1.

    Args:
        similarity: ``(M,)`` positive similarities (:func:`positive_similarity`).
        progress: training progress in [0, 1].
        schedule: see :func:`asp_schedule`.
        lookup: the weight lookup above.
        decay_start: see :func:`asp_schedule`.

    Shape:
        ``(M,) -> (M,)``

    Example:
        >>> asp_weights(torch.tensor([0.0, 1.0]), progress=1.0)
        tensor([0., 2.])
    """
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup: expected one of {LOOKUPS}, got {lookup!r}")
    s = similarity.detach().float()
    if lookup == "linear":
        w1 = s.clamp(min=0)
    elif lookup == "top":
        w1 = torch.sqrt((1 - (s.clamp(0, 1) - 1) ** 2).clamp(min=0))
    elif lookup == "bell":
        w1 = torch.exp(-(((s - 0.5) * 4.0) ** 2) / 2) / math.sqrt(2 * math.pi)
    else:
        w1 = torch.ones_like(s)
    p = asp_schedule(progress, schedule, decay_start)
    w = p + (1 - p) * w1
    return w / w.sum().clamp(min=1e-8) * w.numel()


def adaptive_supervised_patch_nce(query: torch.Tensor, key: torch.Tensor, progress: float,
                                  schedule: str = "lambda", lookup: str = "linear", temperature: float = 0.07,
                                  decay_start: float = 0.5) -> torch.Tensor:
    """ASP loss: PatchNCE between output and real-IHC patches, weighted by :func:`asp_weights`.

    Shape:
        ``(B,N,D), (B,N,D) -> ()``
    """
    losses = patch_nce_loss(query, key, temperature)
    weights = asp_weights(positive_similarity(query, key), progress, schedule, lookup, decay_start)
    return (losses * weights.to(losses)).mean()


def gaussian_pyramid_l1(prediction: torch.Tensor, target: torch.Tensor, levels: int = 4,
                        weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Weighted L1 between the Gaussian pyramids (kornia ``build_pyramid``) of two images.

    Args:
        prediction: ``(B,C,H,W)``.
        target: ``(B,C,H,W)``.
        levels: pyramid levels, the first being the images themselves.
        weights: weight per level (default: equal), as BCI's PyramidPix2pix.

    Shape:
        ``(B,C,H,W), (B,C,H,W) -> ()``

    Example:
        >>> x = torch.rand(1, 3, 32, 32)
        >>> float(gaussian_pyramid_l1(x, x))
        0.0
    """
    from genpath.utils.quiet_imports import import_kornia

    import_kornia()
    from kornia.geometry.transform import build_pyramid

    if prediction.shape != target.shape:
        raise ValueError(f"target: expected the prediction's shape {tuple(prediction.shape)}, "
                         f"got {tuple(target.shape)}")
    if levels < 1 or min(prediction.shape[-2:]) < 2 ** (levels - 1):
        raise ValueError(f"levels: expected 1..log2(side)+1 for {tuple(prediction.shape[-2:])}, got {levels}")
    weights = weights or (1.0,) * levels
    if len(weights) != levels:
        raise ValueError(f"weights: expected {levels} values, got {len(weights)}")
    pred_pyr, tgt_pyr = build_pyramid(prediction, levels), build_pyramid(target, levels)
    total = sum(w * F.l1_loss(p, t) for w, p, t in zip(weights, pred_pyr, tgt_pyr, strict=True))
    return total / sum(weights)


def lsgan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: ``mean((D(x) − 1)²)`` for real, ``mean(D(x)²)`` for fake.

    Example:
        >>> float(lsgan_loss(torch.ones(2, 1, 4, 4), real=True))
        0.0
    """
    return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))
