"""Vahadane stain normalization (sparse non-negative factorisation), batched."""

from __future__ import annotations

from typing import Any

import torch

from normalization.base import StainNormalizer, TissueSample
from normalization.functional import (
    REFERENCE_MAX_CONCENTRATIONS,
    REFERENCE_STAINS,
    concentration_percentiles,
    concentrations_nonneg,
    macenko_stain_matrix,
    od_to_rgb,
    render_od,
    rgb_to_od,
    vahadane_stain_matrix,
)
from normalization.fused import vahadane_apply_uint8
from normalization.vips_maps import nnls_od_map_vips


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
        >>> from genpath.io.images import read_image
        >>> target = read_image("samples/images/he_tiatoolbox_target.png")[:, :128, :128]
        >>> VahadaneNormalizer().fit(target)(target).shape
        torch.Size([3, 128, 128])
    """

    method = "vahadane"
    supports_reference = True
    fused_uint8 = True

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

    def _estimate(self, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        init, valid = macenko_stain_matrix(sample.od, sample.mask)
        stains, valid_v = vahadane_stain_matrix(sample.od, sample.mask, init, self.sparsity, self.n_iter)
        conc = concentrations_nonneg(sample.od.transpose(1, 2), stains)
        maxc = concentration_percentiles(conc, sample.mask, self.percentile)
        return stains, maxc, valid & valid_v & (maxc > 1e-3).all(-1)

    def _fit_target(self, sample: TissueSample) -> None:
        stains, maxc, valid = self._estimate(sample)
        if not bool(valid.all()):
            raise ValueError(
                "target_images: expected H&E-stained tissue, got pixels whose stain vectors "
                "could not be estimated (single colour, noise or too little tissue)"
            )
        self.target_stains.copy_(stains[0])
        self.target_max_concentrations.copy_(maxc[0])

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        stains, maxc, valid = self._estimate(sample)
        return {"stains": stains, "max_concentrations": maxc}, valid

    def _targets(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = like.shape[0]
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return (self.target_stains.to(dtype).expand(b, 3, 2),
                self.target_max_concentrations.to(dtype).expand(b, 2))

    def _apply_source(self, rgb: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        target, target_max = self._targets(rgb)
        conc = concentrations_nonneg(rgb_to_od(rgb, self.io), stats["stains"])
        conc = conc * (target_max / stats["max_concentrations"].clamp(min=1e-3))[..., None, None]
        return od_to_rgb(render_od(conc, target), self.io)

    def _apply_source_uint8(self, images: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        target, target_max = self._targets(images)
        scale = target_max / stats["max_concentrations"].clamp(min=1e-3)
        return vahadane_apply_uint8(images, stats["stains"], scale, target, self.io)

    def _vips_map(self, image: Any, stats: dict[str, torch.Tensor]) -> Any | None:
        target, target_max = self.target_stains.float().cpu(), self.target_max_concentrations.float().cpu()
        scale = target_max / stats["max_concentrations"].clamp(min=1e-3)
        return nnls_od_map_vips(image, stats["stains"], scale, target, self.io)

    def _tile_statistics(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        target, target_max = self._targets(sample.od)
        stains, maxc, valid = self._estimate(sample)
        valid = valid & sample.enough
        if self.on_invalid == "reference":
            stains = torch.where(valid[:, None, None], stains, target)
            ref_conc = concentrations_nonneg(sample.od.transpose(1, 2), target)
            ref_max = concentration_percentiles(ref_conc, sample.mask, self.percentile)
            maxc = torch.where(valid[:, None], maxc, torch.where(ref_max > 1e-3, ref_max, target_max))
        return {"stains": stains, "max_concentrations": maxc}, valid

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        stats, valid = self._tile_statistics(sample)
        return self._apply_source(rgb, stats), valid

    def _normalize_uint8(self, images: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        stats, valid = self._tile_statistics(sample)
        return self._apply_source_uint8(images, stats), valid
