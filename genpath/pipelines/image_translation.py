"""H&E → IHC translation pipelines: a few-step latent diffusion translator and a one-step generator.

:class:`LatentTranslationPipeline` (the diffusion translator): the UNet (diffusers
``UNet2DModel``, no cross-attention) sees the noisy target latents concatenated with the H&E
source latents (posterior mean) and predicts the clean IHC latents (``prediction_type="sample"``),
sampled by a deterministic trailing DDIM (1-4 steps). Content by concatenation, as the stain
normalizer: the output is pixel-aligned with the input, and no ControlNet copy is needed for a
UNet trained from scratch. The initial noise is one ``(1,C,h,w)`` draw from ``generator`` shared
by every tile, so outputs do not depend on the batch (batch-invariant).

:class:`GeneratorTranslationPipeline` (the one-step baseline): a
:class:`~genpath.translation.networks.ResnetTranslator` trained with LSGAN + PatchNCE + ASP +
Gaussian-pyramid L1 (:mod:`genpath.training.translator`), or a published pix2pix / CUT / ASP /
BCI generator converted by ``genpath convert pix2pix``
(:class:`~genpath.translation.resnet_generator.ResnetGenerator`). Same call signature.

Both derive from :class:`ImageTranslationPipeline` (``save_pretrained``; ``from_pretrained``
through :class:`~genpath.pipelines.loading.GenpathPipelineMixin`, so
``ImageTranslationPipeline.from_pretrained(folder)`` loads either kind) and record the stains
they translate between in their config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput

from genpath.image_tensor import to_float_batch
from genpath.models.vae import decode_tiled, downsampling_factor, encode_tiled
from genpath.pipelines.checks import check_steps
from genpath.pipelines.loading import GenpathPipelineMixin
from genpath.pipelines.noise import GeneratorLike, check_generator, shared_noise
from genpath.translation.networks import ResnetTranslator
from genpath.translation.resnet_generator import ResnetGenerator


def _check_size(rgb: torch.Tensor, factor: int, name: str = "images") -> None:
    if rgb.shape[-2] % factor or rgb.shape[-1] % factor:
        raise ValueError(f"{name}: expected height and width divisible by {factor}, "
                         f"got {rgb.shape[-2]}x{rgb.shape[-1]}")


@dataclass
class LatentTranslationPipelineOutput(BaseOutput):
    """Output of :class:`LatentTranslationPipeline`.

    Attributes:
        images: translated tiles, float ``(B,3,H,W)`` in [0, 1] (``"pt"``), or the final latents (``"latent"``).
    """

    images: torch.Tensor


@dataclass
class GeneratorTranslationPipelineOutput(BaseOutput):
    """Output of :class:`GeneratorTranslationPipeline`.

    Attributes:
        images: translated tiles, float ``(B,3,H,W)`` in [0, 1].
    """

    images: torch.Tensor


class ImageTranslationPipeline(GenpathPipelineMixin, DiffusionPipeline):
    """Base of the H&E → IHC pipelines: ``from_pretrained`` on it loads either kind.

    Subclasses provide ``size_multiple`` (input sides must be multiples of it), ``check_components``
    and ``__call__(images, num_inference_steps, generator, output_type, return_dict)``.
    """

    @property
    def size_multiple(self) -> int:
        raise NotImplementedError


class LatentTranslationPipeline(ImageTranslationPipeline):
    """Few-step latent diffusion from a source stain (H&E) to a target stain (IHC).

    Components: ``vae`` (``AutoencoderKL`` shared by both stains), ``unet`` (``UNet2DModel`` with
    ``in_channels = 2 × latent channels``) and ``scheduler`` (a DDIM with ``prediction_type="sample"``).

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> out = pipe(he_tiles, num_inference_steps=4, generator=generator).images  # doctest: +SKIP
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DModel, scheduler: DDIMScheduler,
                 source_stain: str = "H&E", target_stain: str = "IHC") -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)
        self.register_to_config(source_stain=source_stain, target_stain=target_stain)

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (VAE factor × UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_components(self) -> None:
        """Raise a ``ValueError`` when the parts do not fit together (a mismatched checkpoint)."""
        c = self.vae.config.latent_channels
        if self.unet.config.in_channels != 2 * c or self.unet.config.out_channels != c:
            raise ValueError(f"unet: expected in/out channels {2 * c}/{c} for a {c}-channel VAE, "
                             f"got {self.unet.config.in_channels}/{self.unet.config.out_channels}")
        if self.scheduler.config.prediction_type != "sample":
            raise ValueError(f"scheduler: expected prediction_type 'sample' (x0), "
                             f"got {self.scheduler.config.prediction_type!r}")

    def check_inputs(self, rgb: torch.Tensor, num_inference_steps: int, output_type: str,
                     generator: GeneratorLike = None) -> None:
        """Validate everything before any compute is spent."""
        self.check_components()
        _check_size(rgb, self.size_multiple)
        check_steps(num_inference_steps)
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
        check_generator(generator, rgb.shape[0])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, num_inference_steps: int = 4, generator: GeneratorLike = None,
                 output_type: str = "pt", return_dict: bool = True) -> LatentTranslationPipelineOutput | tuple:
        """Translate ``images`` (uint8 or float RGB, ``(B,3,H,W)``/``(3,H,W)``).

        Args:
            images: source tiles; sides divisible by :attr:`size_multiple`.
            num_inference_steps: DDIM steps (1-4 for speed, 20 for reference quality).
            generator: the initial noise's generator: one draw shared by every tile
                (batch-invariant); a list gives each tile its own draw; None is
                ``torch.Generator().manual_seed(0)`` (deterministic by default).
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`LatentTranslationPipelineOutput` (else a tuple ``(images,)``).

        Returns:
            A :class:`LatentTranslationPipelineOutput` with ``.images``.
        """
        # 1. checks
        rgb, _ = to_float_batch(images, "images")
        self.check_inputs(rgb, num_inference_steps, output_type, generator)
        device = self._execution_device
        rgb = rgb.to(device, torch.float32)

        # 2. content: source latents (posterior mean)
        source = encode_tiled(self.vae, rgb)

        # 3. shared initial noise
        latents = shared_noise(tuple(source.shape), generator, source.device, source.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. denoise: x0 predictions, deterministic DDIM
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([self.scheduler.scale_model_input(latents, t), source], 1)
            pred = self.unet(model_in, t).sample
            latents = self.scheduler.step(pred, t, latents, eta=0.0).prev_sample

        # 5. decode
        out = latents if output_type == "latent" else decode_tiled(self.vae, latents, tile=512).clamp(0, 1)
        if not return_dict:
            return (out,)
        return LatentTranslationPipelineOutput(images=out)


class GeneratorTranslationPipeline(ImageTranslationPipeline):
    """One-step translation with a :class:`ResnetTranslator` (the GAN + ASP baseline) or a published ResnetGenerator.

    Example:
        >>> out = pipe(he_tiles).images  # doctest: +SKIP
    """

    def __init__(self, translator: ResnetTranslator | ResnetGenerator, source_stain: str = "H&E",
                 target_stain: str = "IHC") -> None:
        super().__init__()
        self.register_modules(translator=translator)
        self.register_to_config(source_stain=source_stain, target_stain=target_stain)

    @property
    def size_multiple(self) -> int:
        return self.translator.factor

    def check_components(self) -> None:
        """Raise a ``ValueError`` unless ``translator`` is a :class:`ResnetTranslator` or a :class:`ResnetGenerator`."""
        if not isinstance(self.translator, ResnetTranslator | ResnetGenerator):
            raise ValueError(f"translator: expected a ResnetTranslator or ResnetGenerator, "
                             f"got {type(self.translator).__name__}")

    def check_inputs(self, rgb: torch.Tensor, num_inference_steps: int, output_type: str,
                     generator: GeneratorLike = None) -> None:
        """Validate everything before any compute is spent."""
        self.check_components()
        _check_size(rgb, self.size_multiple)
        check_steps(num_inference_steps)
        if output_type != "pt":
            raise ValueError(f"output_type: expected 'pt', got {output_type!r}")
        check_generator(generator, rgb.shape[0])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, num_inference_steps: int = 1, generator: GeneratorLike = None,
                 output_type: str = "pt", return_dict: bool = True) -> GeneratorTranslationPipelineOutput | tuple:
        """Translate ``images``; ``num_inference_steps`` and ``generator`` are accepted for a common interface.

        Args:
            images: source tiles, uint8 or float RGB ``(B,3,H,W)``/``(3,H,W)``; sides divisible by
                :attr:`size_multiple`.
            num_inference_steps: unused (one step).
            generator: unused (deterministic).
            output_type: ``"pt"``.
            return_dict: return a :class:`GeneratorTranslationPipelineOutput` (else a tuple ``(images,)``).

        Returns:
            A :class:`GeneratorTranslationPipelineOutput` with ``.images``.
        """
        # 1. checks
        rgb, _ = to_float_batch(images, "images")
        self.check_inputs(rgb, num_inference_steps, output_type, generator)

        # 2. one forward pass
        out = self.translator(rgb.to(self._execution_device, torch.float32))
        if not return_dict:
            return (out,)
        return GeneratorTranslationPipelineOutput(images=out)
