"""Vahadane stain normalization (sparse non-negative factorisation), batched."""

from __future__ import annotations

from typing import Any

import torch

from normalization.base import StainNormalizer
from normalization.functional import (
    REFERENCE_MAX_CONCENTRATIONS,
    REFERENCE_STAINS,
    concentration_percentiles,
    concentrations_nonneg,
    macenko_stain_matrix,
    od_to_rgb,
    render_od,
    sample_pixels,
    vahadane_stain_matrix,
)


class VahadaneNormalizer(StainNormalizer):
    """Vahadane et al. (2016) structure-preserving normalization.

    Stain vectors come from a sparse non-negative factorisation of each tile's tissue OD
    (initialised from Macenko's estimate); concentrations are non-negative least squares,
    rescaled to the target's percentiles and re-mixed with the target's stain vectors.

    Args:
        sparsity: L1 weight on concentrations in the factorisation (SPAMS' ``lambda1``).
        n_iter: factorisation iterations.
        percentile: concentration percentile matched between tile and target.
        **kwargs: shared settings of :class:`~normalization.base.StainNormalizer`.

    Example:
        >>> target = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
        >>> VahadaneNormalizer().fit(target)(target).shape
        torch.Size([3, 64, 64])
    """

    method = "vahadane"

    def __init__(
        self, sparsity: float = 0.1, n_iter: int = 60, percentile: float = 99.0, **kwargs: Any
    ) -> None:
        kwargs.setdefault("max_pixels", 4096)
        super().__init__(**kwargs)
        if sparsity < 0:
            raise ValueError(f"sparsity: expected a non-negative L1 weight, got {sparsity}")
        if n_iter < 1:
            raise ValueError(f"n_iter: expected at least 1 iteration, got {n_iter}")
        self.sparsity, self.n_iter, self.percentile = float(sparsity), int(n_iter), float(percentile)
        self.config.update(sparsity=self.sparsity, n_iter=self.n_iter, percentile=self.percentile)
        self.register_buffer("target_stains", REFERENCE_STAINS.clone())
        self.register_buffer("target_max_concentrations", REFERENCE_MAX_CONCENTRATIONS.clone())

    def _estimate(
        self, pixels: torch.Tensor, pmask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        init, valid = macenko_stain_matrix(pixels, pmask)
        stains, valid_v = vahadane_stain_matrix(pixels, pmask, init, self.sparsity, self.n_iter)
        conc = concentrations_nonneg(pixels.transpose(1, 2), stains)
        maxc = concentration_percentiles(conc, pmask, self.percentile)
        return stains, maxc, valid & valid_v & (maxc > 1e-3).all(-1)

    def _fit_target(self, rgb: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        stains, maxc, valid = self._estimate(*self._pooled_pixels(rgb, masks))
        if not bool(valid.all()):
            raise ValueError(
                "target_images: expected H&E-stained tissue, got pixels whose stain vectors "
                "could not be estimated (single colour, noise or too little tissue)"
            )
        self.target_stains.copy_(stains[0])
        self.target_max_concentrations.copy_(maxc[0])

    def _normalize(
        self, rgb: torch.Tensor, od: torch.Tensor, mask: torch.Tensor, enough: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = rgb.shape[0]
        target = self.target_stains.to(od).expand(b, 3, 2)
        target_max = self.target_max_concentrations.to(od).expand(b, 2)
        pixels, pmask = sample_pixels(od, mask, self.max_pixels)
        stains, maxc, valid = self._estimate(pixels, pmask)
        valid = valid & enough
        if self.on_invalid == "reference":
            stains = torch.where(valid[:, None, None], stains, target)
            ref_conc = concentrations_nonneg(pixels.transpose(1, 2), target)
            ref_max = concentration_percentiles(ref_conc, pmask, self.percentile)
            ref_max = torch.where(ref_max > 1e-3, ref_max, target_max)
            maxc = torch.where(valid[:, None], maxc, ref_max)
        conc = concentrations_nonneg(od, stains)
        conc = conc * (target_max / maxc.clamp(min=1e-3))[..., None, None]
        out = od_to_rgb(render_od(conc, target), self.io)
        if self.on_invalid != "reference":
            out = torch.where(valid[:, None, None, None], out, rgb)
        return out, valid
