"""A restaining simulator: the same tissue rendered under other stains and scanners.

Real tiles are separated into H and E concentrations (Macenko, per tile); the concentrations are
re-rendered by Beer–Lambert under a sampled *stain style* (H and E OD vectors, per-stain
intensity) and passed through a sampled *scanner response* (per-channel gamma, an S-shaped tone
curve, mild Gaussian blur). This yields triplets with a known answer:

* ``source``: tissue X in style A through scanner A;
* ``reference``: other tissue Y in style B through scanner B (what a user gives as target);
* ``target``: tissue X in style B through scanner B (the ground truth of normalization).

It is the physics-grounded counterpart of StainFuser's SPI-2M and serves to evaluate
normalizers (SSIM/PSNR to ``target``) and to train learned ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genpath.image_tensor import check_image
from genpath.utils.quiet_imports import import_kornia
from normalization.functional import (
    REFERENCE_STAINS,
    concentrations_lstsq,
    macenko_stain_matrix,
    od_to_rgb,
    render_od,
    rgb_to_od,
    sample_pixels,
    tissue_mask_od,
)


@dataclass
class StainStyle:
    """Stain vectors ``(B,3,2)`` and per-stain intensity factors ``(B,2)``."""

    stains: torch.Tensor
    intensity: torch.Tensor


@dataclass
class ScannerResponse:
    """Per-channel gamma ``(B,3)``, S-curve weight ``(B,3)`` in [0, 1] and blur sigma ``(B,)`` in pixels."""

    gamma: torch.Tensor
    contrast: torch.Tensor
    blur_sigma: torch.Tensor


@dataclass
class RestainTriplet:
    """``source``, ``reference`` and ground-truth ``target``, each ``(B,3,H,W)`` float in [0, 1]."""

    source: torch.Tensor
    reference: torch.Tensor
    target: torch.Tensor


def separate_stains(rgb: torch.Tensor, io: float = 240.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tiles into non-negative H&E concentrations and the OD residual two stains leave.

    Shape:
        rgb ``(B,3,H,W)`` -> concentrations ``(B,2,H,W)``, residual ``(B,3,H,W)``.
    """
    od = rgb_to_od(rgb, io)
    pixels = sample_pixels(od)
    stains, _ = macenko_stain_matrix(pixels, tissue_mask_od(pixels, dim=-1))
    conc = concentrations_lstsq(od, stains).clamp(min=0)
    return conc, od - render_od(conc, stains)


def render_style(
    concentrations: torch.Tensor, residual: torch.Tensor, style: StainStyle, io: float = 240.0
) -> torch.Tensor:
    """Beer–Lambert rendering of concentrations under a stain style, plus the OD residual.

    Shape:
        concentrations ``(B,2,H,W)``, residual ``(B,3,H,W)`` -> rgb ``(B,3,H,W)``.
    """
    scaled = concentrations * style.intensity.to(concentrations)[..., None, None]
    return od_to_rgb(render_od(scaled, style.stains.to(concentrations)) + residual, io)


def apply_scanner(rgb: torch.Tensor, scanner: ScannerResponse) -> torch.Tensor:
    """Per-channel monotone tone curve (gamma, then a smoothstep blend) and Gaussian blur.

    Shape:
        rgb ``(B,3,H,W)`` -> ``(B,3,H,W)``.
    """
    y = rgb.clamp(0.0, 1.0) ** scanner.gamma.to(rgb)[..., None, None]
    weight = scanner.contrast.to(rgb)[..., None, None]
    y = (1.0 - weight) * y + weight * (y * y * (3.0 - 2.0 * y))
    sigma = scanner.blur_sigma.to(rgb).clamp(min=1e-3)
    if bool((sigma > 0.05).any()):
        y = import_kornia().filters.gaussian_blur2d(y, (5, 5), torch.stack([sigma, sigma], -1), border_type="reflect")
    return y.clamp(0.0, 1.0)


class RestainingSimulator:
    """Sample stain styles and scanner responses and produce :class:`RestainTriplet` batches.

    Args:
        vector_jitter: spread of the uniform noise added to the reference H and E OD vectors.
        intensity_range: range of per-stain intensity factors.
        gamma_range: range of per-channel scanner gammas.
        contrast_range: range of the S-curve blend weight.
        blur_range: range of the blur sigma in pixels.
        io: background intensity for optical density.

    Example:
        >>> sim = RestainingSimulator()
        >>> g = torch.Generator().manual_seed(0)
        >>> triplet = sim(torch.rand(2, 3, 32, 32) * 0.5 + 0.3, generator=g)
        >>> triplet.target.shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        vector_jitter: float = 0.12,
        intensity_range: tuple[float, float] = (0.7, 1.3),
        gamma_range: tuple[float, float] = (0.8, 1.25),
        contrast_range: tuple[float, float] = (0.0, 0.4),
        blur_range: tuple[float, float] = (0.0, 0.8),
        io: float = 240.0,
    ) -> None:
        for name, (low, high) in [("intensity_range", intensity_range), ("gamma_range", gamma_range),
                                  ("contrast_range", contrast_range), ("blur_range", blur_range)]:
            if not 0.0 <= low <= high:
                raise ValueError(f"{name}: expected 0 <= low <= high, got ({low}, {high})")
        self.vector_jitter, self.io = float(vector_jitter), float(io)
        self.intensity_range, self.gamma_range = intensity_range, gamma_range
        self.contrast_range, self.blur_range = contrast_range, blur_range

    @staticmethod
    def _uniform(
        shape: tuple[int, ...], bounds: tuple[float, float], generator: torch.Generator | None
    ) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator)

    def sample_style(self, n: int, generator: torch.Generator | None = None) -> StainStyle:
        """Draw ``n`` stain styles around the reference H&E vectors."""
        noise = (torch.rand((n, 3, 2), generator=generator) * 2 - 1) * self.vector_jitter
        stains = F.normalize((REFERENCE_STAINS + noise).clamp(min=0.02), dim=1)
        return StainStyle(stains, self._uniform((n, 2), self.intensity_range, generator))

    def sample_scanner(self, n: int, generator: torch.Generator | None = None) -> ScannerResponse:
        """Draw ``n`` scanner responses."""
        return ScannerResponse(
            self._uniform((n, 3), self.gamma_range, generator),
            self._uniform((n, 3), self.contrast_range, generator),
            self._uniform((n,), self.blur_range, generator),
        )

    def __call__(
        self,
        tiles: torch.Tensor,
        references: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        share_target_style: bool = False,
    ) -> RestainTriplet:
        """Make triplets from float tiles ``(B,3,H,W)`` in [0, 1].

        Args:
            tiles: tissue whose ground truth is produced.
            references: tissue shown in the target style; default: the batch rolled by one
                (a spatially flipped copy when ``B == 1``).
            generator: torch generator for reproducible draws.
            share_target_style: one target style and scanner for the whole batch (to evaluate
                normalizers fitted once on a reference).
        """
        check_image(tiles, "tiles")
        if not tiles.is_floating_point() or tiles.ndim != 4:
            raise ValueError(f"tiles: expected float (B,3,H,W), got {tiles.dtype} {tuple(tiles.shape)}")
        b = tiles.shape[0]
        if references is None:
            references = tiles.roll(1, 0) if b > 1 else tiles.flip(-1, -2)
        check_image(references, "references")
        conc, residual = separate_stains(tiles, self.io)
        ref_conc, ref_residual = separate_stains(references.to(tiles), self.io)
        style_a, scanner_a = self.sample_style(b, generator), self.sample_scanner(b, generator)
        nb = 1 if share_target_style else b
        style_b, scanner_b = self.sample_style(nb, generator), self.sample_scanner(nb, generator)
        if share_target_style:
            style_b = StainStyle(style_b.stains.expand(b, 3, 2), style_b.intensity.expand(b, 2))
            scanner_b = ScannerResponse(scanner_b.gamma.expand(b, 3), scanner_b.contrast.expand(b, 3),
                                        scanner_b.blur_sigma.expand(b))
        return RestainTriplet(
            source=apply_scanner(render_style(conc, residual, style_a, self.io), scanner_a),
            reference=apply_scanner(render_style(ref_conc, ref_residual, style_b, self.io), scanner_b),
            target=apply_scanner(render_style(conc, residual, style_b, self.io), scanner_b),
        )
