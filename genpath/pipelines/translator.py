"""One interface over both H&E→IHC translators: load a folder, translate tiles or slides.

:class:`Translator` wraps a :class:`~genpath.pipelines.image_translation.LatentTranslationPipeline`
or :class:`~genpath.pipelines.image_translation.GeneratorTranslationPipeline` as an ``nn.Module``
that follows the tensor contract (uint8 or float RGB, ``(B,3,H,W)`` or ``(3,H,W)``; output keeps
rank, dtype and device; any size, reflect-padded to the model's multiple and cropped back). It
warns when an input looks like IHC already (:func:`~genpath.translation.translator.warn_if_looks_like_ihc`).
Being a module mapping uint8 windows to images, it plugs straight into the whole-slide engine
(overlapping windows, feathered blending, pyramidal TIFF / OME-Zarr output).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genpath.image_tensor import to_float_batch
from genpath.pipelines.image_translation import ImageTranslationPipeline
from genpath.pipelines.loading import check_pretrained_folder
from genpath.translation.translator import warn_if_looks_like_ihc


class Translator(nn.Module):
    """Translate H&E images to IHC with a trained translator folder.

    Args:
        model: a translator folder (``LatentTranslationPipeline`` or ``GeneratorTranslationPipeline``),
            or a loaded pipeline.
        num_inference_steps: diffusion steps (ignored by the one-step generator).
        seed: seed of the diffusion translator's shared initial noise (a fresh generator per call,
            so every call gives the same output).
        warn_ihc_threshold: warn when an input's brown (DAB) share of coloured pixels exceeds this;
            None disables the check.

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)``, uint8 or float -> same.

    Example:
        >>> translator = Translator("out/train/translator_bci_gan/pipeline")  # doctest: +SKIP
        >>> ihc = translator(he_tiles)  # doctest: +SKIP
    """

    def __init__(self, model: str | Path | ImageTranslationPipeline, num_inference_steps: int = 4, seed: int = 0,
                 warn_ihc_threshold: float | None = 0.4) -> None:
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        if isinstance(model, ImageTranslationPipeline):
            pipe = model
        else:
            folder = check_pretrained_folder(model, "model", "translator folder")
            pipe = ImageTranslationPipeline.from_pretrained(folder)
        self.pipe = pipe
        self.modules_ = nn.ModuleList(c for c in pipe.components.values() if isinstance(c, nn.Module))
        self.num_inference_steps, self.seed, self.warn_ihc_threshold = num_inference_steps, seed, warn_ihc_threshold

    @property
    def kind(self) -> str:
        return "diffusion" if type(self.pipe).__name__ == "LatentTranslationPipeline" else "generator"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb, restore = to_float_batch(images, "images")
        warn_if_looks_like_ihc(rgb, self.warn_ihc_threshold, stacklevel=3)
        m = self.pipe.size_multiple
        h, w = rgb.shape[-2:]
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            rgb = F.pad(rgb, (0, pw, 0, ph), mode=mode)
        device = next(self.modules_.parameters()).device
        generator = torch.Generator().manual_seed(self.seed)
        out = self.pipe(rgb.to(device, torch.float32), num_inference_steps=self.num_inference_steps,
                        generator=generator).images
        return restore(out[..., :h, :w].to(rgb.device, rgb.dtype))
