"""StainTransferPipeline: source content + target style → the source tissue in the target's stain.

A small StainFuser: conditional latent diffusion whose UNet sees the noisy latents concatenated
with the *source* latents (content: pixel-aligned, no extra network) and cross-attends to *style*
tokens of the reference (:class:`~genpath.models.style.StyleTokenizer` over its latent cells).

Design choices, against the published StainFuser (SD-2.1 + ControlNet, 20 steps, per-batch
min-max on slides):

* Content by latent concatenation, not a ControlNet: the UNet is trained from scratch, so there
  is no frozen backbone to protect; concatenation costs 4 input channels instead of a copy of
  the encoder.
* Style from the reference's latent cells (posterior mean, encoded once and cached), selected
  by tissue weight, so background in the target does not count.
* Few steps: the UNet predicts the clean latents (``prediction_type="sample"``) and a
  deterministic DDIM sampler with ``"trailing"`` spacing starts from noise at ``t = T``; one step
  is the conditional mean, more steps add detail.
* Batch-invariant: the initial noise is one ``(1,C,h,w)`` draw from ``generator`` shared by every
  tile (:func:`~genpath.pipelines.noise.shared_noise`), and every operation is per sample, so a
  tile's output does not depend on its companions.
* Detail transfer (optional): the small VAE loses fine detail; adding the source's own VAE
  residual ``source - decode(encode(source))`` restores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput

from genpath.models.style import StyleTokenizer, latent_cells
from genpath.models.vae import decode_tiled, downsampling_factor, encode_tiled
from genpath.pipelines.checks import check_conditioning, check_images, check_steps
from genpath.pipelines.loading import GenpathPipelineMixin
from genpath.pipelines.noise import GeneratorLike, check_generator, shared_noise
from normalization.functional import rgb_to_od, tissue_mask_od


def stain_transfer_scheduler() -> DDIMScheduler:
    """Build the deterministic few-step sampler the model is trained for (x0 prediction, trailing steps)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="sample", timestep_spacing="trailing",
                         clip_sample=False, set_alpha_to_one=True)


def tissue_weights(rgb: torch.Tensor, factor: int, io: float = 240.0) -> torch.Tensor:
    """Share of tissue pixels per ``factor``×``factor`` cell.

    Shape:
        rgb ``(B,3,H,W)`` float -> ``(B,1,H/f,W/f)``.
    """
    od = rgb_to_od(rgb, io)
    mask = tissue_mask_od(od).to(rgb)[:, None]
    return F.avg_pool2d(mask, factor)


@dataclass
class StainTransferPipelineOutput(BaseOutput):
    """Output of :class:`StainTransferPipeline`.

    Attributes:
        images: restained tiles, float ``(B,3,H,W)`` in [0, 1] (``"pt"``), or the final latents (``"latent"``).
        style_tokens: the style tokens ``(1,N,D)`` used (encode once, pass back as ``style_tokens=``).
    """

    images: torch.Tensor
    style_tokens: torch.Tensor | None = None


class StainTransferPipeline(GenpathPipelineMixin, DiffusionPipeline):
    """Restain source tiles in the style of a reference.

    Components: ``vae`` (``AutoencoderKL``), ``unet`` (``UNet2DConditionModel`` with
    ``in_channels = 2 × latent channels``), ``style_tokenizer`` (:class:`StyleTokenizer`) and
    ``scheduler`` (:func:`stain_transfer_scheduler`).

    Example:
        >>> pipe = StainTransferPipeline.from_pretrained("samples/checkpoints/stainfuser_small")  # doctest: +SKIP
        >>> tokens = pipe.encode_style(reference)  # doctest: +SKIP
        >>> out = pipe(tiles, style_tokens=tokens, num_inference_steps=4).images  # doctest: +SKIP
    """

    model_cpu_offload_seq = "style_tokenizer->unet->vae"

    def __init__(
        self, vae: AutoencoderKL, unet: UNet2DConditionModel, style_tokenizer: StyleTokenizer,
        scheduler: DDIMScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, style_tokenizer=style_tokenizer, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    def check_components(self) -> None:
        """Raise a ``ValueError`` when the components do not fit together (a mismatched checkpoint)."""
        c = self.vae.config.latent_channels
        if self.unet.config.in_channels != 2 * c or self.unet.config.out_channels != c:
            raise ValueError(
                f"unet: expected in/out channels {2 * c}/{c} for a {c}-channel VAE, "
                f"got {self.unet.config.in_channels}/{self.unet.config.out_channels}"
            )
        if self.style_tokenizer.config.latent_channels != c:
            got = self.style_tokenizer.config.latent_channels
            raise ValueError(f"style_tokenizer: expected latent_channels {c}, got {got}")
        if self.style_tokenizer.config.cross_attention_dim != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"style_tokenizer: expected cross_attention_dim {self.unet.config.cross_attention_dim} (the UNet's), "
                f"got {self.style_tokenizer.config.cross_attention_dim}"
            )

    def _check_images(self, images: torch.Tensor, name: str) -> torch.Tensor:
        return check_images(images, name, self.vae_scale_factor)

    @torch.no_grad()
    def reference_cells(self, references: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent cells and tissue weights of one or several references, pooled into one set ``(1,M,C)``."""
        images = [references] if isinstance(references, torch.Tensor) else list(references)
        if not images:
            raise ValueError("references: expected at least one image, got an empty sequence")
        cells, weights = [], []
        for i, image in enumerate(images):
            rgb = self._check_images(image, f"references[{i}]").to(self._execution_device)
            latents = encode_tiled(self.vae, rgb, tile=512)
            c, w = latent_cells(latents, tissue_weights(rgb, self.vae_scale_factor))
            cells.append(c.reshape(1, -1, c.shape[-1]))
            weights.append(w.reshape(1, -1))
        return torch.cat(cells, 1), torch.cat(weights, 1)

    @torch.no_grad()
    def encode_style(self, references: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Style tokens ``(1,1+N,D)`` of the reference(s): encode once and pass as ``style_tokens``."""
        return self.style_tokenizer(*self.reference_cells(references))

    def check_inputs(self, rgb: torch.Tensor, style_tokens: torch.Tensor, num_inference_steps: int,
                     output_type: str, generator: GeneratorLike = None) -> None:
        """Validate everything before any compute is spent."""
        self.check_components()
        d = self.unet.config.cross_attention_dim
        if not isinstance(style_tokens, torch.Tensor):
            raise ValueError(f"style_tokens: expected a tensor from encode_style, got {type(style_tokens).__name__}")
        if style_tokens.ndim != 3 or style_tokens.shape[-1] != d or style_tokens.shape[0] not in (1, rgb.shape[0]):
            raise ValueError(
                f"style_tokens: expected (1 or B,N,{d}) from encode_style, got {tuple(style_tokens.shape)}"
            )
        check_conditioning(style_tokens, "style_tokens")
        check_steps(num_inference_steps)
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
        check_generator(generator, rgb.shape[0])

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        style_tokens: torch.Tensor | None = None,
        reference: torch.Tensor | Sequence[torch.Tensor] | None = None,
        num_inference_steps: int = 4,
        generator: GeneratorLike = None,
        detail_transfer: bool = True,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> StainTransferPipelineOutput | tuple:
        """Restain ``images`` in the style given by ``style_tokens`` (or a ``reference`` to encode).

        Args:
            images: source tiles, uint8 or float RGB ``(B,3,H,W)``/``(3,H,W)``, sides divisible
                by the VAE factor.
            style_tokens: from :meth:`encode_style` (preferred: encode the target once).
            reference: target image(s), encoded here when ``style_tokens`` is None.
            num_inference_steps: DDIM steps (1–4 for speed, 20 for reference quality).
            generator: the initial noise's generator: one draw shared by every tile
                (batch-invariant); a list gives each tile its own draw; None is
                ``torch.Generator().manual_seed(0)`` (deterministic by default).
            detail_transfer: add the source's VAE reconstruction residual to the output.
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`StainTransferPipelineOutput` (else a tuple ``(images, style_tokens)``).

        Returns:
            A :class:`StainTransferPipelineOutput` with ``.images`` and ``.style_tokens``.
        """
        # 1. checks and style
        if style_tokens is None:
            if reference is None:
                raise ValueError("style_tokens: expected tokens from encode_style or a reference image, got neither")
            style_tokens = self.encode_style(reference)
        rgb = self._check_images(images, "images")
        self.check_inputs(rgb, style_tokens, num_inference_steps, output_type, generator)
        device, batch = self._execution_device, rgb.shape[0]
        rgb = rgb.to(device)
        tokens = style_tokens.to(device, self.unet.dtype).expand(batch, -1, -1)

        # 2. content: source latents (posterior mean)
        source = encode_tiled(self.vae, rgb)

        # 3. initial noise: one draw for all tiles, so outputs do not depend on the batch
        noise = shared_noise(tuple(source.shape), generator, source.device, source.dtype)
        latents = noise * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. denoise: x0 predictions, deterministic DDIM
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([self.scheduler.scale_model_input(latents, t), source], 1)
            pred = self.unet(model_in, t, encoder_hidden_states=tokens).sample
            latents = self.scheduler.step(pred, t, latents, eta=0.0).prev_sample

        # 5. decode (+ the source's reconstruction residual)
        if output_type == "latent":
            images = latents
        else:
            out = decode_tiled(self.vae, latents, tile=512)
            if detail_transfer:
                out = out + (rgb - decode_tiled(self.vae, source, tile=512))
            images = out.clamp(0, 1)
        if not return_dict:
            return (images, style_tokens)
        return StainTransferPipelineOutput(images=images, style_tokens=style_tokens)
