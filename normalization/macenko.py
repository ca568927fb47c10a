"""Macenko stain normalization, batched."""

from __future__ import annotations

from typing import Any, Literal

import torch

from normalization.base import StainNormalizer, TissueSample
from normalization.functional import (
    REFERENCE_MAX_CONCENTRATIONS,
    REFERENCE_STAINS,
    apply_od_map,
    concentration_percentiles,
    concentrations_lstsq,
    macenko_stain_matrix,
    stain_transfer_matrix,
)
from normalization.fused import apply_od_map_uint8
from normalization.vips_maps import od_map_vips


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. (2009) normalization as one 3×3 optical-density map per tile.

    Stain vectors come from the angle percentiles of each tile's tissue OD in its principal
    plane; the tile's concentrations are rescaled to the target's percentiles and re-mixed
    with the target's stain vectors: ``od_out = S_t · diag(m_t / m_s) · pinv(S_s) · od``.

    Args:
        alpha: angle percentile (percent) for the extreme stain directions.
        percentile: concentration percentile matched between tile and target.
        percentile_pixels: ``"tissue"`` (default) takes the concentration percentile over tissue
            pixels only, so a tile's share of background does not change its scaling;
            ``"all"`` uses every pixel, as torchstain does (agreement mode).
        **kwargs: shared settings of :class:`~normalization.base.StainNormalizer`.

    Example:
        >>> from genpath.io.images import read_image
        >>> target = read_image("samples/images/he_tiatoolbox_target.png")[:, :128, :128]
        >>> norm = MacenkoNormalizer().fit(target)
        >>> norm(target).dtype
        torch.uint8
    """

    method = "macenko"
    supports_reference = True
    fused_uint8 = True

    def __init__(
        self,
        alpha: float = 1.0,
        percentile: float = 99.0,
        percentile_pixels: Literal["tissue", "all"] = "tissue",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if percentile_pixels not in ("tissue", "all"):
            raise ValueError(f"percentile_pixels: expected 'tissue' or 'all', got {percentile_pixels!r}")
        if not 0.0 < alpha < 50.0:
            raise ValueError(f"alpha: expected a percentile in (0, 50), got {alpha}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], got {percentile}")
        self.alpha, self.percentile, self.percentile_pixels = float(alpha), float(percentile), percentile_pixels
        self.config.update(alpha=self.alpha, percentile=self.percentile, percentile_pixels=percentile_pixels)
        self.register_buffer("target_stains", REFERENCE_STAINS.clone())
        self.register_buffer("target_max_concentrations", REFERENCE_MAX_CONCENTRATIONS.clone())

    def _max_concentrations(self, sample: TissueSample, stains: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(sample.mask) if self.percentile_pixels == "all" else sample.mask
        return concentration_percentiles(concentrations_lstsq(sample.od.transpose(1, 2), stains), mask, self.percentile)

    def _fit_target(self, sample: TissueSample) -> None:
        stains, valid = macenko_stain_matrix(sample.od, sample.mask, self.alpha)
        if not bool(valid.all()):
            raise ValueError(
                "target_images: expected H&E-stained tissue, got pixels whose stain vectors "
                "could not be estimated (single colour, noise or too little tissue)"
            )
        self.target_stains.copy_(stains[0])
        self.target_max_concentrations.copy_(self._max_concentrations(sample, stains)[0])

    def transfer_matrices(self, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tile 3×3 OD maps ``(B,3,3)`` and validity ``(B,)``; invalid tiles get the policy's map."""
        b = sample.od.shape[0]
        target = self.target_stains.to(sample.od).expand(b, 3, 2)
        target_max = self.target_max_concentrations.to(sample.od).expand(b, 2)
        stains, valid = macenko_stain_matrix(sample.od, sample.mask, self.alpha)
        maxc = self._max_concentrations(sample, stains)
        valid = valid & sample.enough & (maxc > 1e-3).all(-1)
        matrix = stain_transfer_matrix(stains, maxc, target, target_max)
        if self.on_invalid == "reference":
            ref_max = self._max_concentrations(sample, target)
            ref_max = torch.where(ref_max > 1e-3, ref_max, target_max)
            fallback = stain_transfer_matrix(target, ref_max, target, target_max)
        else:
            fallback = torch.eye(3, dtype=matrix.dtype, device=matrix.device).expand(b, 3, 3)
        return torch.where(valid[:, None, None], matrix, fallback), valid

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        stains, valid = macenko_stain_matrix(sample.od, sample.mask, self.alpha)
        maxc = self._max_concentrations(sample, stains)
        return {"stains": stains, "max_concentrations": maxc}, valid & (maxc > 1e-3).all(-1)

    def _source_matrix(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        stains = stats["stains"]
        b = stains.shape[0]
        target = self.target_stains.to(stains).expand(b, 3, 2)
        target_max = self.target_max_concentrations.to(stains).expand(b, 2)
        return stain_transfer_matrix(stains, stats["max_concentrations"], target, target_max)

    def _apply_source(self, rgb: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return apply_od_map(rgb, self._source_matrix(stats), self.io)

    def _apply_source_uint8(self, images: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return apply_od_map_uint8(images, self._source_matrix(stats), self.io)

    def _vips_map(self, image: Any, stats: dict[str, torch.Tensor]) -> Any | None:
        return od_map_vips(image, self._source_matrix({k: v[None] for k, v in stats.items()})[0], self.io)

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        matrix, valid = self.transfer_matrices(sample)
        return apply_od_map(rgb, matrix, self.io), valid

    def _normalize_uint8(self, images: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        matrix, valid = self.transfer_matrices(sample)
        return apply_od_map_uint8(images, matrix, self.io), valid
