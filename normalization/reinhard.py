"""Reinhard colour normalization, batched."""

from __future__ import annotations

from typing import Any

import torch

from normalization.base import StainNormalizer
from normalization.functional import lab_statistics, reinhard_transfer


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) colour transfer: match each tile's LAB mean and std to the target.

    Statistics are taken over tissue pixels only (any channel's OD at least ``beta``, mean OD at
    most ``od_max``), so a tile's share of white background does not shift its colours; this is
    the one intentional difference from torchstain, which uses every pixel.

    Args:
        tissue_only: compute statistics on tissue pixels (default) or on all pixels.
        min_std: a tile whose LAB std is below this in every channel is single-coloured: invalid.
        **kwargs: shared settings of :class:`~normalization.base.StainNormalizer`.

    Example:
        >>> target = torch.rand(3, 32, 32) * 0.6
        >>> ReinhardNormalizer().fit(target)(target).shape
        torch.Size([3, 32, 32])
    """

    method = "reinhard"

    def __init__(self, tissue_only: bool = True, min_std: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tissue_only, self.min_std = bool(tissue_only), float(min_std)
        self.config.update(tissue_only=self.tissue_only, min_std=self.min_std)
        self.register_buffer("target_mean", torch.zeros(3))
        self.register_buffer("target_std", torch.ones(3))

    def _tissue_mask(self, od: torch.Tensor) -> torch.Tensor:
        stained = (od >= self.beta).any(dim=-3)
        return stained & (od.mean(dim=-3) <= self.od_max)

    def _fit_target(self, rgb: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        pixels = torch.cat([x.flatten(2) for x in rgb], -1).unsqueeze(-1)  # (1,3,N,1)
        mask = torch.cat([m.flatten(1) for m in masks], -1).unsqueeze(-1)  # (1,N,1)
        mean, std = lab_statistics(pixels, mask if self.tissue_only else None)
        self.target_mean.copy_(mean[0])
        self.target_std.copy_(std[0])

    def _normalize(
        self, rgb: torch.Tensor, od: torch.Tensor, mask: torch.Tensor, enough: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = rgb.shape[0]
        mean, std = lab_statistics(rgb, mask if self.tissue_only else None)
        valid = enough & (std > self.min_std).any(-1)
        # An invalid tile is mapped onto itself under either tolerant policy: Reinhard has no
        # stain matrix to borrow, so "reference" and "passthrough" coincide.
        out = reinhard_transfer(
            rgb, mean, std, self.target_mean.to(rgb).expand(b, 3), self.target_std.to(rgb).expand(b, 3)
        )
        return torch.where(valid[:, None, None, None], out, rgb), valid
