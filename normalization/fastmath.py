"""Small exact kernels behind the batched stain estimates: partial selection and closed-form 2x2 algebra.

* :func:`masked_quantile` (nearest-rank quantiles of masked rows) selects instead of sorting:
  Macenko's 1st/99th percentiles need a hundred values from each end of ~13,000.
* :func:`pinv_stains`, :func:`largest_eigenvalue_2x2` and :func:`inverse_2x2` replace batched
  LAPACK calls on tiny matrices, whose per-call cost dominates at these sizes.

All are per row / per matrix: results do not depend on batch companions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float | Sequence[float]) -> torch.Tensor:
    """Quantiles over the masked entries of each row (nearest rank, as torchstain's ``percentile``).

    Ranks near either end (Macenko's 1st/99th percentiles) come from a partial selection
    (``topk`` of the few smallest or largest, not a full sort); the rank's value does not depend
    on how many are selected, so rows stay independent of their batch companions. Ranks far
    from both ends share one sort. Rows without any masked entry return 0.

    Shape:
        values ``(...,N)``, mask ``(...,N)`` or broadcastable to it -> ``(...)`` for a float ``q``,
        ``(...,len(q))`` for a sequence.

    Example:
        >>> masked_quantile(torch.arange(5.0)[None], torch.ones(1, 5, dtype=torch.bool), 0.5)
        tensor([2.])
    """
    qs = torch.tensor([q] if isinstance(q, int | float) else list(q), dtype=values.dtype, device=values.device)
    batch = values.shape[:-1]
    count = mask.sum(dim=-1, keepdim=True).expand(*batch, 1)  # a broadcastable mask is summed once
    index = torch.round(qs * (count - 1).clamp(min=0).to(values.dtype)).long()  # ascending rank, (...,len(q))
    limit = max(1, values.shape[-1] // 16)
    out = torch.empty(index.shape, dtype=values.dtype, device=values.device)
    # 0 on masked entries, +inf elsewhere: values + away sorts the rest last, values - away first
    # (arithmetic instead of masked_fill: one vectorised pass per side)
    away = mask.to(values.dtype).reciprocal_().sub_(1.0)
    sorted_: torch.Tensor | None = None
    for j, qj in enumerate(qs.tolist()):
        rank = index[..., j : j + 1] if qj <= 0.5 else (count - 1 - index[..., j : j + 1]).clamp(min=0)
        k = int(rank.max()) + 1 if rank.numel() else 1
        if k <= limit:  # a partial selection from the nearer end
            out[..., j : j + 1] = _extremes(values, away, k, largest=qj > 0.5).gather(-1, rank)
        else:
            if sorted_ is None:
                sorted_ = (values + away).sort(dim=-1).values
            out[..., j : j + 1] = sorted_.gather(-1, index[..., j : j + 1])
    out = torch.where(count > 0, out, torch.zeros_like(out))
    return out.squeeze(-1) if isinstance(q, int | float) else out


def _extremes(values: torch.Tensor, away: torch.Tensor, k: int, largest: bool, group: int = 8) -> torch.Tensor:
    """Return the ``k`` smallest (or largest) of ``values ± away`` along the last dim, sorted, as ``topk``.

    Exact, and cheaper than one ``topk`` over long rows: the row is split into ``group`` strided
    slices; the ``k`` positions whose slice-wise extreme (over their ``group`` members) is most
    extreme hold, between them, every value of the true top ``k`` (or an equal one), so one
    small ``topk`` picks those positions and a second one the values among their members.
    """
    n = values.shape[-1]
    width = -(-n // group)
    fill = float("-inf") if largest else float("inf")
    padded = torch.full((*values.shape[:-1], group * width), fill, dtype=values.dtype, device=values.device)
    (torch.sub if largest else torch.add)(values, away, out=padded[..., :n])
    if k * group * 4 > n:
        return padded.topk(min(k, n), dim=-1, largest=largest).values
    members = padded.unflatten(-1, (group, width))  # member i of position p: element i·width + p
    extreme = members.amax(-2) if largest else members.amin(-2)
    chosen = extreme.topk(k, dim=-1, largest=largest, sorted=False).indices.unsqueeze(-2)
    candidates = members.gather(-1, chosen.expand(*chosen.shape[:-2], group, k)).flatten(-2)
    return candidates.topk(k, dim=-1, largest=largest).values


def pinv_stains(stains: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of two-column stain matrices, ``(SᵀS)⁻¹Sᵀ`` in closed form (float64 inside).

    A batched SVD (``torch.linalg.pinv``) of tiny matrices costs milliseconds; the closed form
    microseconds. Nearly parallel or degenerate columns fall back to ``torch.linalg.pinv``.

    Shape:
        stains ``(B,3,2)`` -> ``(B,2,3)``.

    Example:
        >>> s = torch.tensor([[[0.6, 0.2], [0.7, 0.8], [0.4, 0.6]]])
        >>> torch.allclose(pinv_stains(s), torch.linalg.pinv(s), atol=1e-5)
        True
    """
    s = stains.double()
    gram = s.transpose(-1, -2) @ s
    a, b, d = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    det = a * d - b * b
    ok = det > 1e-8 * (a * d)  # columns more than ~0.006° apart, neither zero
    adjugate = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2)
    inv = adjugate / torch.where(ok, det, 1.0)[..., None, None]
    out = inv @ s.transpose(-1, -2)
    if not bool(ok.all()):
        out = torch.where(ok[..., None, None], out, torch.linalg.pinv(s))
    return out.to(stains.dtype)


def largest_eigenvalue_2x2(m: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of symmetric ``(B,2,2)`` matrices, in closed form (a batched LAPACK call costs more)."""
    a, b, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 1]
    return (a + d) / 2 + torch.sqrt(((a - d) / 2) ** 2 + b * b)


def inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    """Inverse of ``(B,2,2)`` matrices by the adjugate (callers keep them well conditioned)."""
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    adjugate = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    return adjugate / (a * d - b * c)[:, None, None]
