"""One interface over both H&E→IHC translators: load a folder, translate tiles or slides.

:class:`Translator` wraps a :class:`~genpath.pipelines.image_translation.LatentTranslationPipeline`
or :class:`~genpath.pipelines.image_translation.GeneratorTranslationPipeline` as an ``nn.Module``
that follows the tensor contract (uint8 or float RGB, ``(B,3,H,W)`` or ``(3,H,W)``; output keeps
rank, dtype and device; any size, reflect-padded to the model's multiple and cropped back). It
warns when an input looks like IHC already (:func:`~genpath.translation.stains.looks_like_ihc`).
Being a module mapping uint8 windows to images, it plugs straight into the slide engine
(:func:`normalization.slide.normalize_slide`: overlapping windows, feathered blending,
pyramidal TIFF / OME-Zarr output).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genpath.image_tensor import to_float_batch
from genpath.translation.stains import brown_share

PIPELINES = ("LatentTranslationPipeline", "GeneratorTranslationPipeline")


class LooksLikeIHCWarning(UserWarning):
    """An input to an H&E→IHC translator looks like DAB IHC already."""


def load_translation_pipeline(path: str | Path):  # noqa: ANN201 - one of PIPELINES
    """Load a translator folder (``model_index.json``) in float32 and check its parts."""
    from genpath.pipelines import image_translation

    path = Path(path)
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"model: expected a translator folder with model_index.json, got {path}")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"model: expected one of {PIPELINES}, got {name} in {path}")
    pipe = getattr(image_translation, name).from_pretrained(str(path), torch_dtype=torch.float32)
    pipe.check_components()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Translator(nn.Module):
    """Translate H&E images to IHC with a trained translator folder.

    Args:
        model: a translator folder, or a loaded pipeline.
        num_inference_steps: diffusion steps (ignored by the one-step generator).
        seed: seed of the diffusion translator's shared initial noise.
        warn_ihc_threshold: warn when an input's brown (DAB) share of coloured pixels exceeds this;
            None disables the check.

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)``, uint8 or float -> same.

    Example:
        >>> translator = Translator("out/train/translator_bci_gan/pipeline")  # doctest: +SKIP
        >>> ihc = translator(he_tiles)  # doctest: +SKIP
    """

    def __init__(self, model, num_inference_steps: int = 4, seed: int = 0,  # noqa: ANN001
                 warn_ihc_threshold: float | None = 0.4) -> None:
        super().__init__()
        pipe = model if hasattr(model, "check_components") else load_translation_pipeline(model)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        self.pipe = pipe
        self.modules_ = nn.ModuleList(c for c in pipe.components.values() if isinstance(c, nn.Module))
        self.num_inference_steps, self.seed, self.warn_ihc_threshold = num_inference_steps, seed, warn_ihc_threshold

    @property
    def kind(self) -> str:
        return "diffusion" if type(self.pipe).__name__ == "LatentTranslationPipeline" else "generator"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb, restore = to_float_batch(images, "images")
        if self.warn_ihc_threshold is not None:
            share = brown_share(rgb)
            flagged = (share > self.warn_ihc_threshold).nonzero().flatten().tolist()
            if flagged:
                warnings.warn(
                    f"images: expected H&E input, got {len(flagged)} image(s) that look like DAB IHC already "
                    f"(brown share {share[flagged[0]]:.2f} > {self.warn_ihc_threshold}; indices {flagged[:8]}); "
                    "translating anyway", LooksLikeIHCWarning, stacklevel=2)
        m = self.pipe.size_multiple
        h, w = rgb.shape[-2:]
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            rgb = F.pad(rgb, (0, pw, 0, ph), mode=mode)
        device = next(self.modules_.parameters()).device
        out = self.pipe(rgb.to(device, torch.float32), num_inference_steps=self.num_inference_steps,
                        seed=self.seed).images
        return restore(out[..., :h, :w].to(rgb.device, rgb.dtype))
