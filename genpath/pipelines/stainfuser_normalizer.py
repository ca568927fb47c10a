"""StainFuserNormalizer: the diffusion stain normalizers behind the classical normalizer interface.

The ``model`` folder's ``model_index.json`` picks the pipeline:

* ``StainTransferPipeline`` (genpath's own few-step model, e.g. ``samples/checkpoints/stainfuser_small``):
  ``fit(target)`` encodes the target once (posterior-mean latents → style tokens), 4 steps by default;
* ``StainFuserPipeline`` (the published StainFuser, from ``genpath convert stainfuser``): ``fit``
  encodes the target once into its VAE tokens (a posterior sample drawn from
  ``torch.Generator().manual_seed(seed + 1)``, apart from the initial noise's ``seed``), 20 PNDM
  steps by default. StainFuser's own scripts draw a fresh target sample and fresh noise for every
  tile of every batch and min-max-normalise each WSI batch; here every tile sees the same target
  tokens and the same noise, and inputs are taken as they are.

The tokens are kept in the ``style_tokens`` buffer (saved with :meth:`save`). Tiles with too
little tissue pass through unchanged and never reach the model (a white tile stays white; no
compute spent), like the classical methods' ``on_invalid="passthrough"``. Output is deterministic
given ``seed`` and independent of the batch a tile is in. The models have no slide-level source
statistics, so whole slides go through overlapping windows with feathered blending
(``genpath normalize --method stainfuser --overlap 32``).

It lives with the pipelines (it needs them) and reaches the ``normalization`` registry through
the ``genpath.normalizers`` entry point declared in ``pyproject.toml``, so
``build_normalizer("stainfuser", model=...)`` and ``StainNormalizer.load(state)`` find it while
``normalization`` never imports ``genpath.pipelines``. Importing this module is cheap: the
diffusion pipeline (and diffusers) load when a normalizer is built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from genpath.pipelines.loading import check_pretrained_folder
from normalization.base import StainNormalizer, TissueSample

#: model_index.json ``_class_name`` -> (default steps, detail transfer available)
PIPELINES = {"StainTransferPipeline": (4, True), "StainFuserPipeline": (20, False)}


def pipeline_name(folder: Path) -> str:
    """Return the pipeline class name a model folder's ``model_index.json`` records.

    An unreadable index gives ``StainTransferPipeline``, whose loader then names the problem.

    Raises:
        ValueError: the folder holds a pipeline other than the two stain normalizers.
    """
    try:
        name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return "StainTransferPipeline"
    if name not in PIPELINES:
        raise ValueError(f"model: expected a {' or '.join(PIPELINES)} folder, got _class_name {name!r} in {folder}")
    return name


class StainFuserNormalizer(StainNormalizer):
    """Diffusion stain normalization to a fitted target (few-step, batch-invariant).

    Args:
        model: a ``StainTransferPipeline`` folder (e.g. ``samples/checkpoints/stainfuser_small``) or a
            ``StainFuserPipeline`` folder (``genpath convert stainfuser``).
        num_inference_steps: sampler steps (None: 4 for StainTransferPipeline, 1 is fastest; 20 PNDM
            steps for StainFuserPipeline, as published).
        seed: seed of the shared initial noise (a fresh ``torch.Generator().manual_seed(seed)``
            per call, so every call gives the same output).
        detail_transfer: add back the source's VAE reconstruction residual (None: on for
            StainTransferPipeline; StainFuserPipeline has no such step, so only None/False).
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
        num_inference_steps: int | None = None,
        seed: int = 0,
        detail_transfer: bool | None = None,
        min_target_tissue: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model is None:
            raise ValueError("model: expected a StainTransferPipeline or StainFuserPipeline folder (--model DIR), "
                             "got None")
        if num_inference_steps is not None and not num_inference_steps >= 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        if not 0.0 <= min_target_tissue <= 1.0:
            raise ValueError(f"min_target_tissue: expected a share in [0, 1], got {min_target_tissue}")
        folder = check_pretrained_folder(model, "model", "StainTransferPipeline or StainFuserPipeline folder")
        self.pipeline_name = pipeline_name(folder)
        default_steps, has_detail_transfer = PIPELINES[self.pipeline_name]
        if detail_transfer and not has_detail_transfer:
            raise ValueError(f"detail_transfer: expected None or False for a {self.pipeline_name} folder (the "
                             "published model has no detail-transfer step), got True")
        steps = default_steps if num_inference_steps is None else int(num_inference_steps)
        detail = has_detail_transfer if detail_transfer is None else bool(detail_transfer)
        self.config.update(model=str(model), num_inference_steps=steps, seed=int(seed), detail_transfer=detail,
                           min_target_tissue=float(min_target_tissue))
        self.num_inference_steps, self.seed = steps, int(seed)
        self.detail_transfer, self.min_target_tissue = detail, float(min_target_tissue)
        # diffusers is imported only when a normalizer is built
        if self.pipeline_name == "StainFuserPipeline":
            from genpath.pipelines.stainfuser_published import StainFuserPipeline as pipeline_class
        else:
            from genpath.pipelines.stain_transfer import StainTransferPipeline as pipeline_class
        # a plain attribute, not a submodule: saved states hold the fitted target, not the weights
        self.pipeline = pipeline_class.from_pretrained(folder)
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
        """Encode the target(s) into style tokens (StainTransferPipeline) or target tokens (StainFuserPipeline), once.

        Several targets are pooled (StainFuserPipeline: their tokens concatenated).

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
        if self.pipeline_name == "StainFuserPipeline":  # its own stream, apart from the initial noise's
            tokens = self.pipeline.encode_target(images, generator=torch.Generator().manual_seed(self.seed + 1))
        else:
            tokens = self.pipeline.encode_style(images)
        self.style_tokens = tokens.detach().to(self.fitted.device)
        self.fitted.fill_(True)
        return self

    def _normalize(self, rgb: torch.Tensor, sample: TissueSample) -> tuple[torch.Tensor, torch.Tensor]:
        out = rgb.clone()
        keep = sample.enough.nonzero().flatten()  # too little tissue: never sent to the model
        if keep.numel():
            generator = torch.Generator().manual_seed(self.seed)
            if self.pipeline_name == "StainFuserPipeline":
                done = self.pipeline(rgb[keep], target_tokens=self.style_tokens,
                                     num_inference_steps=self.num_inference_steps, generator=generator).images
            else:
                done = self.pipeline(rgb[keep], style_tokens=self.style_tokens,
                                     num_inference_steps=self.num_inference_steps, generator=generator,
                                     detail_transfer=self.detail_transfer).images
            out[keep] = done.to(rgb)
        return out, sample.enough

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError("StainFuserNormalizer works per tile: normalize slides with overlapping windows")
