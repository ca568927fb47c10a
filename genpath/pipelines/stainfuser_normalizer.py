"""StainFuserNormalizer: the diffusion stain normalizer behind the classical normalizer interface.

``fit(target)`` encodes the target once (posterior-mean latents → style tokens, kept in a
buffer); ``forward(images)`` restains tiles with :class:`~genpath.pipelines.StainTransferPipeline`.
Tiles with too little tissue pass through unchanged (a white tile stays white; the model never
sees it), like the classical methods' ``on_invalid="passthrough"``. Output is deterministic given
``seed`` and independent of the batch a tile is in. The model has no slide-level source
statistics, so whole slides go through overlapping windows with feathered blending
(``genpath normalize --method stainfuser --overlap 32``).

It lives with the pipelines (it needs them) and reaches the ``normalization`` registry through
the ``genpath.normalizers`` entry point declared in ``pyproject.toml``, so
``build_normalizer("stainfuser", model=...)`` and ``StainNormalizer.load(state)`` find it while
``normalization`` never imports ``genpath.pipelines``. Importing this module is cheap: the
diffusion pipeline (and diffusers) load when a normalizer is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from genpath.pipelines.loading import check_pretrained_folder
from normalization.base import StainNormalizer, TissueSample


class StainFuserNormalizer(StainNormalizer):
    """Diffusion stain normalization to a fitted target (few-step, batch-invariant).

    Args:
        model: a ``StainTransferPipeline`` folder (e.g. ``samples/checkpoints/stainfuser_small``).
        num_inference_steps: sampler steps (4 by default; 1 is fastest).
        seed: seed of the shared initial noise (a fresh ``torch.Generator().manual_seed(seed)``
            per call, so every call gives the same output).
        detail_transfer: add back the source's VAE reconstruction residual.
        min_target_tissue: a target needs at least this share of tissue pixels.
        **kwargs: tissue settings of :class:`~normalization.base.StainNormalizer` (``io``,
            ``beta``, ``min_tissue_fraction``, ``on_invalid``: ``"reference"`` acts as passthrough).

    Example:
        >>> norm = StainFuserNormalizer("samples/checkpoints/stainfuser_small").fit(target)  # doctest: +SKIP
        >>> out = norm(tiles)  # doctest: +SKIP
    """

    method: ClassVar[str] = "stainfuser"
    uses_source_statistics: ClassVar[bool] = False

    def __init__(
        self,
        model: str | Path | None = None,
        num_inference_steps: int = 4,
        seed: int = 0,
        detail_transfer: bool = True,
        min_target_tissue: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model is None:
            raise ValueError("model: expected a StainTransferPipeline folder (--model DIR), got None")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        if not 0.0 <= min_target_tissue <= 1.0:
            raise ValueError(f"min_target_tissue: expected a share in [0, 1], got {min_target_tissue}")
        folder = check_pretrained_folder(model, "model", "StainTransferPipeline folder")
        self.config.update(model=str(model), num_inference_steps=int(num_inference_steps), seed=int(seed),
                           detail_transfer=bool(detail_transfer), min_target_tissue=float(min_target_tissue))
        self.num_inference_steps, self.seed = int(num_inference_steps), int(seed)
        self.detail_transfer, self.min_target_tissue = bool(detail_transfer), float(min_target_tissue)
        from genpath.pipelines.stain_transfer import StainTransferPipeline  # diffusers: only when built

        # a plain attribute, not a submodule: saved states hold the fitted style, not the weights
        self.pipeline = StainTransferPipeline.from_pretrained(folder)
        self.register_buffer("style_tokens", torch.zeros(0))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module hook (.to, .half, ...)
        self.pipeline.to(fn(torch.zeros(())).device)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        key = prefix + "style_tokens"
        if key in state_dict:  # the fitted token count depends on the target
            self.style_tokens = torch.empty_like(state_dict[key], device=self.fitted.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit(
        self,
        target_images: torch.Tensor | Sequence[torch.Tensor],
        tissue_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> Self:
        """Encode the target(s) into style tokens (once).

        Raises:
            ValueError: the targets are mostly background (less than ``min_target_tissue``).
        """
        sample = self._pool(target_images, tissue_mask, "target_images")
        share = float(sample.mask.float().mean())
        if share < self.min_target_tissue:
            raise ValueError(
                f"target_images: expected at least {self.min_target_tissue:.0%} tissue pixels, got {share:.1%} "
                "(a mostly-background target has no stain style to learn from)"
            )
        images = [target_images] if isinstance(target_images, torch.Tensor) else list(target_images)
        self.style_tokens = self.pipeline.encode_style(images).detach().to(self.fitted.device)
        self.fitted.fill_(True)
        return self

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        out = self.pipeline(rgb, style_tokens=self.style_tokens, num_inference_steps=self.num_inference_steps,
                            generator=generator, detail_transfer=self.detail_transfer).images
        return out.to(rgb), sample.enough

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError("StainFuserNormalizer works per tile: normalize slides with overlapping windows")
