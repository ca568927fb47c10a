"""EmbeddingToImagePipeline: SSL embeddings in, histology tiles out (latent diffusion)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel, VQModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput

from genpath.models.conditioning import EmbeddingProjector
from genpath.models.linear_projector import LinearEmbeddingProjector
from genpath.models.vae import decode_tiled, downsampling_factor
from genpath.pipelines.checks import MAX_GUIDANCE, check_conditioning, check_number, check_size, check_steps
from genpath.pipelines.loading import GenpathPipelineMixin
from genpath.pipelines.noise import GeneratorLike, check_generator, initial_latents

OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def check_latent_components(vae: AutoencoderKL, unet: UNet2DConditionModel, projector: EmbeddingProjector) -> None:
    """Raise a one-line ``ValueError`` when a VAE, UNet and embedding projector do not fit together."""
    c = vae.config.latent_channels
    if unet.config.in_channels != c or unet.config.out_channels != c:
        raise ValueError(f"unet: expected in/out channels {c}/{c} for a {c}-channel VAE, "
                         f"got {unet.config.in_channels}/{unet.config.out_channels}")
    if unet.config.cross_attention_dim != projector.config.cross_attention_dim:
        raise ValueError(f"projector: expected cross_attention_dim {unet.config.cross_attention_dim} (the UNet's), "
                         f"got {projector.config.cross_attention_dim}")


@dataclass
class EmbeddingToImagePipelineOutput(BaseOutput):
    """Output of :class:`EmbeddingToImagePipeline`.

    Attributes:
        images: float ``(B,3,H,W)`` in [0, 1] (``"pt"``), a ``(B,H,W,3)`` array (``"np"``), a list
            of PIL images (``"pil"``) or the final latents ``(B,C,h,w)`` (``"latent"``).
    """

    images: torch.Tensor | np.ndarray | list[Any]


class EmbeddingToImagePipeline(GenpathPipelineMixin, DiffusionPipeline):
    """Generate tiles conditioned on encoder embeddings, with classifier-free guidance.

    Components: ``vae`` (``AutoencoderKL``), ``unet`` (``UNet2DConditionModel`` over latents),
    ``projector`` (:class:`~genpath.models.conditioning.EmbeddingProjector`) and any diffusers
    ``scheduler`` (DDIM and DPM-Solver are tested). Save with ``save_pretrained``; load with
    ``from_pretrained`` (:class:`~genpath.pipelines.loading.GenpathPipelineMixin`: local,
    float32, checked).

    Example:
        >>> images = pipe(embeddings, num_inference_steps=20, guidance_scale=2.0,
        ...               generator=torch.Generator().manual_seed(0)).images  # doctest: +SKIP
    """

    model_cpu_offload_seq = "projector->unet->vae"
    _optional_components: list[str] = []

    def __init__(
        self,
        vae: AutoencoderKL | VQModel,
        unet: UNet2DConditionModel,
        projector: EmbeddingProjector | LinearEmbeddingProjector,
        scheduler: KarrasDiffusionSchedulers,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, projector=projector, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    def check_components(self) -> None:
        """Raise a ``ValueError`` when the parts do not fit together (a mismatched checkpoint)."""
        check_latent_components(self.vae, self.unet, self.projector)

    def check_inputs(self, embeddings: torch.Tensor, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, output_type: str, generator: GeneratorLike = None) -> None:
        """Validate everything before any compute is spent."""
        self.check_components()
        self.projector.check_embeddings(embeddings)
        check_conditioning(embeddings, "embeddings")
        f = self.vae_scale_factor
        check_size(height, "height", f)
        check_size(width, "width", f)
        check_steps(num_inference_steps)
        check_number(guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE, "1 = no guidance")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected pt, np, pil or latent, got {output_type!r}")
        check_generator(generator, embeddings.shape[0])

    @torch.no_grad()
    def __call__(
        self,
        embeddings: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        generator: GeneratorLike = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        decode_tile: int | None = None,
        return_dict: bool = True,
    ) -> EmbeddingToImagePipelineOutput | tuple:
        """Generate one image per embedding.

        Args:
            embeddings: ``(B,D)`` encoder embeddings.
            height: output height in pixels (default: the UNet's sample size × VAE factor).
            width: output width in pixels (same default).
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance weight; 1 disables guidance (no null pass).
            generator: torch generator(s) for the initial noise (a list: one per image, so an
                image does not depend on its batch); None draws fresh noise.
            latents: initial noise ``(B,C,h,w)`` instead of sampling it.
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]), ``"np"``, ``"pil"`` or ``"latent"``.
            decode_tile: decode in blended tiles of this many pixels (large images).
            return_dict: return an :class:`EmbeddingToImagePipelineOutput` (else a tuple ``(images,)``).

        Returns:
            An :class:`EmbeddingToImagePipelineOutput` with ``.images``.
        """
        # 1. defaults and checks
        f = self.vae_scale_factor
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        self.check_inputs(embeddings, height, width, num_inference_steps, guidance_scale, output_type, generator)
        device, batch = self._execution_device, embeddings.shape[0]

        # 2. conditioning tokens (and null tokens for guidance)
        tokens = self.projector(embeddings.to(device))
        do_cfg = guidance_scale != 1.0
        if do_cfg:
            tokens = torch.cat([self.projector.null_tokens(batch).to(tokens), tokens])

        # 3. initial noise and timesteps
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        latents = initial_latents(self.scheduler, num_inference_steps, shape, latents, generator, device,
                                  tokens.dtype, keep_dtype=True)

        # 4. denoising loop
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = self.unet(model_in, t, encoder_hidden_states=tokens).sample
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample

        # 5. decode and convert
        if output_type == "latent":
            images = latents
        else:
            images = decode_tiled(self.vae, latents, tile=decode_tile)
            if output_type == "np":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
            elif output_type == "pil":
                from PIL import Image

                arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                images = [Image.fromarray(a) for a in arrays]
        if not return_dict:
            return (images,)
        return EmbeddingToImagePipelineOutput(images=images)
