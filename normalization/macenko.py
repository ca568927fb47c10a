"""Macenko stain normalization, batched."""

from __future__ import annotations

from typing import Any, Literal

import torch

from normalization.base import StainNormalizer
from normalization.functional import (
    REFERENCE_MAX_CONCENTRATIONS,
    REFERENCE_STAINS,
    concentration_percentiles,
    concentrations_lstsq,
    macenko_stain_matrix,
    od_to_rgb,
    sample_pixels,
    stain_transfer_matrix,
)


def stain_statistics(
    od: torch.Tensor,
    mask: torch.Tensor,
    stains: torch.Tensor,
    max_pixels: int,
    percentile: float = 99.0,
) -> torch.Tensor:
    """Per-tile ``percentile`` of each stain's least-squares concentration over tissue pixels.

    Shape:
        od ``(B,3,H,W)``, mask ``(B,H,W)``, stains ``(B,3,2)`` -> ``(B,2)``.
    """
    pixels, pmask = sample_pixels(od, mask, max_pixels)
    return concentration_percentiles(concentrations_lstsq(pixels.transpose(1, 2), stains), pmask, percentile)


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. (2009) normalization as one 3×3 optical-density map per tile.

    Stain vectors come from the angle percentiles of each tile's tissue OD in its principal
    plane; the tile's concentrations are rescaled to the target's 99th percentiles and re-mixed
    with the target's stain vectors: ``od_out = S_t · diag(m_t / m_s) · pinv(S_s) · od``.

    Args:
        alpha: angle percentile (percent) for the extreme stain directions.
        percentile: concentration percentile matched between tile and target.
        percentile_pixels: ``"tissue"`` (default) takes the concentration percentile over tissue
            pixels only, so a tile's share of background does not change its scaling;
            ``"all"`` uses every pixel, as torchstain does (agreement mode).
        **kwargs: shared settings of :class:`~normalization.base.StainNormalizer`.

    Example:
        >>> target = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
        >>> norm = MacenkoNormalizer().fit(target)
        >>> norm(target).dtype
        torch.uint8
    """

    method = "macenko"

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
        self.percentile_pixels = percentile_pixels
        if not 0.0 < alpha < 50.0:
            raise ValueError(f"alpha: expected a percentile in (0, 50), got {alpha}")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile: expected a value in (50, 100], got {percentile}")
        self.alpha, self.percentile = float(alpha), float(percentile)
        self.config.update(alpha=self.alpha, percentile=self.percentile, percentile_pixels=percentile_pixels)
        self.register_buffer("target_stains", REFERENCE_STAINS.clone())
        self.register_buffer("target_max_concentrations", REFERENCE_MAX_CONCENTRATIONS.clone())

    def estimate_stains(
        self, od: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tile stain matrices ``(B,3,2)`` and validity ``(B,)`` from OD and tissue mask."""
        pixels, pmask = sample_pixels(od, mask, self.max_pixels)
        return macenko_stain_matrix(pixels, pmask, self.alpha)

    def _fit_target(self, rgb: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        pooled, pooled_mask = self._pooled_pixels(rgb, masks)
        stains, valid = macenko_stain_matrix(pooled, pooled_mask, self.alpha)
        if self.percentile_pixels == "all":
            pooled_mask = torch.ones_like(pooled_mask)
        if not bool(valid.all()):
            raise ValueError(
                "target_images: expected H&E-stained tissue, got pixels whose stain vectors "
                "could not be estimated (single colour, noise or too little tissue)"
            )
        conc = concentrations_lstsq(pooled.transpose(1, 2), stains)
        maxc = concentration_percentiles(conc, pooled_mask, self.percentile)
        self.target_stains.copy_(stains[0])
        self.target_max_concentrations.copy_(maxc[0])

    def _normalize(
        self, rgb: torch.Tensor, od: torch.Tensor, mask: torch.Tensor, enough: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = rgb.shape[0]
        target = self.target_stains.to(od).expand(b, 3, 2)
        target_max = self.target_max_concentrations.to(od).expand(b, 2)
        stains, valid = self.estimate_stains(od, mask)
        conc_mask = torch.ones_like(mask) if self.percentile_pixels == "all" else mask
        maxc = stain_statistics(od, conc_mask, stains, self.max_pixels, self.percentile)
        valid = valid & enough & (maxc > 1e-3).all(-1)
        matrix = stain_transfer_matrix(stains, maxc, target, target_max)
        if self.on_invalid == "reference":
            ref_max = stain_statistics(od, conc_mask, target, self.max_pixels, self.percentile)
            ref_max = torch.where(ref_max > 1e-3, ref_max, target_max)
            fallback = stain_transfer_matrix(target, ref_max, target, target_max)
        else:
            fallback = torch.eye(3, dtype=od.dtype, device=od.device).expand(b, 3, 3)
        matrix = torch.where(valid[:, None, None], matrix, fallback)
        out = od_to_rgb(torch.einsum("bij,bjhw->bihw", matrix, od), self.io)
        if self.on_invalid != "reference":
            out = torch.where(valid[:, None, None, None], out, rgb)
        return out, valid
