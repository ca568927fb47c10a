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

Colour anchor (``colour_anchor="reinhard"``, the default for ``StainTransferPipeline``): the
model's output is mapped per tile so that its glass-weighted LAB mean and std match the target's
(:func:`normalization.colour_anchor.reinhard_anchor`; glass stays white). The model keeps the
structure, the anchor pins the colour: zero-shot on the MITOS scanner pairs at 4 steps it moves
ΔE2000 4× from 13.50 to 10.42 (Reinhard alone 11.03) and SSIM 4× from 0.348 to 0.358
(``benchmarks/stainfuser_accuracy.py``). It forces every tile to the target's colour statistics,
so it costs where tile and target differ in content: on restaining-simulator triplets (other
PCam tiles as targets) ΔE2000 rises from 9.86 to 13.02 at 4 steps (``colour_anchor="none"``
there). ``StainFuserPipeline`` folders default to ``"none"`` (unmeasured here). States saved
before the anchor existed load with it off.

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

from genpath.image_tensor import to_float_batch
from genpath.pipelines.loading import check_pretrained_folder
from genpath.utils.logging import get_logger
from normalization.base import StainNormalizer, TissueSample
from normalization.colour_anchor import ANCHORS, anchor_statistics, reinhard_anchor

logger = get_logger(__name__)

#: model_index.json ``_class_name`` -> (default steps, detail transfer available, default colour anchor)
PIPELINES = {"StainTransferPipeline": (4, True, "reinhard"), "StainFuserPipeline": (20, False, "none")}


#: ``model_index.json`` key of the step count a folder's model is meant to sample with (a distilled
#: one-step student records 1; ``genpath.training.distill.DEFAULT_STEPS_KEY``)
DEFAULT_STEPS_KEY = "_default_inference_steps"


def folder_default_steps(folder: Path) -> int | None:
    """Return the step count ``folder/model_index.json`` records (``_default_inference_steps``), or None.

    A missing, unreadable or non-positive-integer value gives None (the pipeline's default applies).
    """
    try:
        value = json.loads((folder / "model_index.json").read_text()).get(DEFAULT_STEPS_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


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
        num_inference_steps: sampler steps (None: the folder's ``_default_inference_steps`` when its
            ``model_index.json`` records one, e.g. 1 for a distilled student; else 4 for
            StainTransferPipeline, 1 is fastest; 20 PNDM steps for StainFuserPipeline, as published).
        seed: seed of the shared initial noise (a fresh ``torch.Generator().manual_seed(seed)``
            per call, so every call gives the same output).
        detail_transfer: add back the source's VAE reconstruction residual (None: on for
            StainTransferPipeline; StainFuserPipeline has no such step, so only None/False).
        min_target_tissue: a target needs at least this share of tissue pixels.
        colour_anchor: ``"reinhard"`` maps each output tile's glass-weighted LAB mean/std to the
            target's (see the module docstring), ``"none"`` returns the model's colours; None:
            ``"reinhard"`` for StainTransferPipeline, ``"none"`` for StainFuserPipeline.
        anchor_white_od: OD (against pure white) below which a pixel counts partly as glass for
            the anchor: neither counted nor changed at OD 0.
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
        colour_anchor: str | None = None,
        anchor_white_od: float = 0.05,
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
        if colour_anchor is not None and colour_anchor not in ANCHORS:
            raise ValueError(f"colour_anchor: expected one of {ANCHORS} or None, got {colour_anchor!r}")
        if not 0.0 < anchor_white_od <= 1.0:
            raise ValueError(f"anchor_white_od: expected an optical density in (0, 1], got {anchor_white_od}")
        folder = check_pretrained_folder(model, "model", "StainTransferPipeline or StainFuserPipeline folder")
        self.pipeline_name = pipeline_name(folder)
        default_steps, has_detail_transfer, default_anchor = PIPELINES[self.pipeline_name]
        if detail_transfer and not has_detail_transfer:
            raise ValueError(f"detail_transfer: expected None or False for a {self.pipeline_name} folder (the "
                             "published model has no detail-transfer step), got True")
        default_steps = folder_default_steps(folder) or default_steps
        steps = default_steps if num_inference_steps is None else int(num_inference_steps)
        detail = has_detail_transfer if detail_transfer is None else bool(detail_transfer)
        anchor = default_anchor if colour_anchor is None else colour_anchor
        self.config.update(model=str(model), num_inference_steps=steps, seed=int(seed), detail_transfer=detail,
                           min_target_tissue=float(min_target_tissue), colour_anchor=anchor,
                           anchor_white_od=float(anchor_white_od))
        self.num_inference_steps, self.seed = steps, int(seed)
        self.detail_transfer, self.min_target_tissue = detail, float(min_target_tissue)
        self.colour_anchor, self.anchor_white_od = anchor, float(anchor_white_od)
        # diffusers is imported only when a normalizer is built
        if self.pipeline_name == "StainFuserPipeline":
            from genpath.pipelines.stainfuser_published import StainFuserPipeline as pipeline_class
        else:
            from genpath.pipelines.stain_transfer import StainTransferPipeline as pipeline_class
        # a plain attribute, not a submodule: saved states hold the fitted target, not the weights
        self.pipeline = pipeline_class.from_pretrained(folder)
        self.register_buffer("style_tokens", torch.zeros(0))
        # the target's glass-weighted LAB mean and std, for the colour anchor
        self.register_buffer("anchor_mean", torch.zeros(3))
        self.register_buffer("anchor_std", torch.ones(3))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module hook (.to, .half, ...)
        self.pipeline.to(fn(torch.zeros(())).device)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              *args, **kwargs) -> None:
        key = prefix + "style_tokens"
        if key in state_dict:  # the fitted token count depends on the target
            self.style_tokens = torch.empty_like(state_dict[key], device=self.fitted.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)
        anchor_keys = [prefix + "anchor_mean", prefix + "anchor_std"]
        if any(k in missing_keys for k in anchor_keys):  # saved before the colour anchor existed: keep it off
            for k in anchor_keys:
                if k in missing_keys:
                    missing_keys.remove(k)
            if self.colour_anchor != "none":
                logger.warning("state has no colour-anchor statistics (saved by an older genpath): colour_anchor "
                               "is off; fit again to anchor the colours")
            self.colour_anchor = self.config["colour_anchor"] = "none"

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
        floats = [to_float_batch(image, f"target_images[{i}]")[0].to(self.fitted.device)
                  for i, image in enumerate(images)]
        masks = None if tissue_mask is None else (
            torch.as_tensor(tissue_mask).bool() if isinstance(tissue_mask, torch.Tensor)
            else [None if m is None else torch.as_tensor(m).bool() for m in tissue_mask])
        mean, std = anchor_statistics(floats, self.anchor_white_od, masks)
        if self.pipeline_name == "StainFuserPipeline":  # its own stream, apart from the initial noise's
            tokens = self.pipeline.encode_target(images, generator=torch.Generator().manual_seed(self.seed + 1))
        else:
            tokens = self.pipeline.encode_style(images)
        self.style_tokens = tokens.detach().to(self.fitted.device)
        self.anchor_mean.copy_(mean)
        self.anchor_std.copy_(std)
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
            out[keep] = self.anchor(done.to(rgb))
        return out, sample.enough

    def anchor(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the colour anchor (``colour_anchor``) to model outputs, float ``(B,3,H,W)`` in [0, 1].

        With ``"none"`` the images come back as they are; never in place.
        """
        if self.colour_anchor == "none":
            return images
        return reinhard_anchor(images, self.anchor_mean, self.anchor_std, self.anchor_white_od)

    def _estimate_source(self, sample: TissueSample) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        raise NotImplementedError("StainFuserNormalizer works per tile: normalize slides with overlapping windows")
