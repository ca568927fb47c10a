"""Reinhard colour normalization, batched."""

from __future__ import annotations

from typing import Any

import torch

from normalization.base import StainNormalizer, TissueSample
from normalization.functional import lab_statistics, od_eigen, od_plane_validity, reinhard_transfer
from normalization.fused import lab_of_uint8_pixels, lab_transfer_matrices, reinhard_transfer_uint8
from normalization.vips_maps import reinhard_lab_map_vips


def _sample_lab_statistics(
    sample: TissueSample, tissue_only: bool, uint8: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """LAB mean and std ``(B,3)`` of the sampled pixels (tissue only, or all).

    With ``uint8`` (the sample came from uint8 tiles) LAB is taken through the byte tables of
    :func:`~normalization.fused.lab_of_uint8_pixels`: the same values, a few passes instead of kornia's dozens.
    """
    if not uint8:
        pixels = sample.rgb.transpose(1, 2).unsqueeze(-1)  # (B,3,N,1)
        return lab_statistics(pixels, sample.mask.unsqueeze(-1) if tissue_only else None)
    lab = lab_of_uint8_pixels((sample.rgb * 255.0).round_().to(torch.uint8))  # (B,3,N)
    weight = sample.mask[:, None].to(lab) if tissue_only else torch.ones_like(lab[:, :1])
    count = weight.sum(-1).clamp(min=1.0)
    mean = (lab * weight).sum(-1) / count
    var = (((lab - mean.unsqueeze(-1)) ** 2) * weight).sum(-1) / count
    return mean, var.sqrt().clamp(min=1e-3)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) colour transfer: match each tile's LAB mean and std to the target.

    Statistics are taken over tissue pixels only (any channel's OD at least ``beta``, mean OD at
    most ``od_max``), so a tile's share of white background does not shift its colours; this is
    the one intentional difference from torchstain, which uses every pixel (``tissue_only=False``
    reproduces it). Reinhard has no stain matrix to borrow, so under ``on_invalid="reference"``
    invalid tiles pass through as under ``"passthrough"``.

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
    fused_uint8 = True

    def __init__(self, tissue_only: bool = True, min_std: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tissue_only, self.min_std = bool(tissue_only), float(min_std)
        self.config.update(tissue_only=self.tissue_only, min_std=self.min_std)
        self.register_buffer("target_mean", torch.zeros(3))
        self.register_buffer("target_std", torch.ones(3))

    def _tissue_mask(self, od_pixels: torch.Tensor) -> torch.Tensor:
        stained = od_pixels.amax(dim=-1) >= self.beta  # a vectorised (od >= beta).any
        return stained & (od_pixels.mean(dim=-1) <= self.od_max)

    def _fit_target(self, sample: TissueSample) -> None:
        mean, std = _sample_lab_statistics(sample, self.tissue_only)
        self.target_mean.copy_(mean[0])
        self.target_std.copy_(std[0])

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mean, std = _sample_lab_statistics(sample, self.tissue_only)
        return {"mean": mean, "std": std}, (std > self.min_std).any(-1)

    def _apply_source(self, rgb: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        b = rgb.shape[0]
        target_mean, target_std = self.target_mean.to(rgb).expand(b, 3), self.target_std.to(rgb).expand(b, 3)
        return reinhard_transfer(rgb, stats["mean"], stats["std"], target_mean, target_std)

    def _apply_source_uint8(self, images: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        b = images.shape[0]
        target_mean, target_std = self.target_mean.float().expand(b, 3), self.target_std.float().expand(b, 3)
        return reinhard_transfer_uint8(images, stats["mean"], stats["std"], target_mean, target_std)

    def _vips_map(self, image: Any, stats: dict[str, torch.Tensor]) -> Any | None:
        p, q = lab_transfer_matrices(stats["mean"][None], stats["std"][None], self.target_mean.float().cpu()[None],
                                     self.target_std.float().cpu()[None])
        return reinhard_lab_map_vips(image, p[0], q[0])

    def _tile_statistics(self, sample: TissueSample, uint8: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mean, std = _sample_lab_statistics(sample, self.tissue_only, uint8)
        has_stains = od_plane_validity(od_eigen(sample.od, sample.mask)[0])  # rejects noise and flat tiles
        return {"mean": mean, "std": std}, sample.enough & (std > self.min_std).any(-1) & has_stains

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        stats, valid = self._tile_statistics(sample, uint8=False)
        return self._apply_source(rgb, stats), valid

    def _normalize_uint8(self, images: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        stats, valid = self._tile_statistics(sample, uint8=True)
        return self._apply_source_uint8(images, stats), valid
