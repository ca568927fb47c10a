"""StainFuserPipeline: the published StainFuser (Jewsbury et al. 2024) run the way its code runs it.

StainFuser restains a *source* tile in the stain of a *target* image: an SD-2.1-base UNet
(``unet``) and a ControlNet copy of its encoder (``controlnet``) denoise the latents of the
output, the source RGB is the ControlNet's condition, and the target's VAE latents, flattened to
one 4-d token per latent cell, are the cross-attention context of both (each through its own
Linear 4→1024). Converted from the released checkpoint by ``genpath convert stainfuser``
(:mod:`genpath.pipelines.convert_stainfuser`).

What follows the published code (``R-J96/stainFuser``: ``src/recipe.py``
``StainFuserEngine.denoising_inference``, ``src/models/arch.py``, ``src/models/wsi.py``,
``src/dataset.py``, ``src/misc/utils.py``):

* the target goes into the VAE in [0, 1] (``ToTensor()``, no [-1, 1] mapping), its posterior is
  *sampled* (``latent_dist.sample()``) and scaled by ``scaling_factor`` (0.18215), then
  reshaped ``(B,4,h,w) → (B,h·w,4)``;
* the source RGB in [0, 1] is ``controlnet_cond`` (3 channels: ``conditioning_embedding_in_channels=4``
  in ``load_stainFuser`` never reaches ``ControlNetModel``);
* the ControlNet's projector (``encoder_projector``, here ``controlnet.encoder_hid_proj``) is
  applied by the pipeline: diffusers' ``ControlNetModel`` builds ``encoder_hid_proj`` but its
  ``forward`` never applies it (checked on diffusers 0.42); the UNet applies its own;
* PNDM (PLMS, ``skip_prk_steps``), 20 steps by default, epsilon prediction, no guidance;
* the decoded image is mapped from [-1, 1] (``inverse_transform(..., is_tsf=True)``: clamp, +1, /2).

Where genpath departs (each on purpose):

* **One noise draw for the batch** (:func:`~genpath.pipelines.noise.shared_noise`) and one target
  sample for the batch: the published code draws both per batch row from the global RNG, so a
  tile's output depends on its batch and on the run. Here the output is deterministic given
  ``generator`` and the same alone or among others (what seam-free slides need).
* **No per-batch min-max**: ``src/models/wsi.py`` rescales each WSI batch by its own min and max
  before inference (so a tile's input depends on its batch companions); genpath takes [0, 1]
  images as they are (uint8 / 255).
* **Sizes**: the published scripts resize sources to the target's size (and ``run_wsi.py``
  resizes the target to 512 px, nearest); here the target is used at its own size (its token
  count may differ from the source's latent cell count) and sources are never resized.
* **Several targets** (a list) are pooled by concatenating their tokens (the published code
  takes one target).
* Outputs are floats in [0, 1]; the published script truncates ``× 255`` to uint8, genpath's
  writers round.

Example:
    >>> pipe = StainFuserPipeline.from_pretrained("stainfuser_converted")  # doctest: +SKIP
    >>> out = pipe(tiles, target=target_tile).images  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from genpath.models.vae import downsampling_factor
from genpath.pipelines.checks import check_conditioning, check_images, check_steps
from genpath.pipelines.loading import GenpathPipelineMixin
from genpath.pipelines.noise import GeneratorLike, check_generator, shared_noise

#: StainFuser's published default (``--diffusion_steps 20``).
DEFAULT_STEPS = 20


@dataclass
class StainFuserPipelineOutput(BaseOutput):
    """Output of :class:`StainFuserPipeline`.

    Attributes:
        images: restained tiles, float ``(B,3,H,W)`` in [0, 1] (``"pt"``), or the final latents (``"latent"``).
        target_tokens: the target tokens ``(1,N,4)`` used (pass them back as ``target_tokens=``).
    """

    images: torch.Tensor
    target_tokens: torch.Tensor | None = None


class StainFuserPipeline(GenpathPipelineMixin, DiffusionPipeline):
    """Restain source tiles in the stain of a target image with the published StainFuser weights.

    Components: ``vae`` (``AutoencoderKL``, SD-2.1-base), ``unet`` (``UNet2DConditionModel`` with
    ``encoder_hid_dim = 4``, ``encoder_hid_dim_type = "text_proj"``), ``controlnet``
    (``ControlNetModel`` with the same projector) and ``scheduler`` (``PNDMScheduler``).

    Example:
        >>> pipe = StainFuserPipeline.from_pretrained("stainfuser_converted")  # doctest: +SKIP
        >>> tokens = pipe.encode_target(target, generator=torch.Generator().manual_seed(1))  # doctest: +SKIP
        >>> out = pipe(tiles, target_tokens=tokens, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    """

    model_cpu_offload_seq = "controlnet->unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, controlnet: ControlNetModel,
                 scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, controlnet=controlnet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    @property
    def token_dim(self) -> int:
        """Width of a target token: the VAE's latent channels (4)."""
        return int(self.vae.config.latent_channels)

    def check_components(self) -> None:
        """Raise a one-line ``ValueError`` naming the component that does not fit the others."""
        c, unet, net = self.token_dim, self.unet.config, self.controlnet.config
        if unet.in_channels != c or unet.out_channels != c:
            raise ValueError(f"unet: expected in/out channels {c}/{c} for a {c}-channel VAE, "
                             f"got {unet.in_channels}/{unet.out_channels}")
        if net.in_channels != c:
            raise ValueError(f"controlnet: expected in_channels {c} for a {c}-channel VAE, got {net.in_channels}")
        for name, cfg in (("unet", unet), ("controlnet", net)):
            if cfg.encoder_hid_dim != c or cfg.encoder_hid_dim_type != "text_proj":
                raise ValueError(f"{name}: expected encoder_hid_dim {c} with encoder_hid_dim_type 'text_proj' (the "
                                 f"target-token projector), got {cfg.encoder_hid_dim} / {cfg.encoder_hid_dim_type!r}")
        if net.cross_attention_dim != unet.cross_attention_dim:
            raise ValueError(f"controlnet: expected cross_attention_dim {unet.cross_attention_dim} (the UNet's), "
                             f"got {net.cross_attention_dim}")
        if tuple(net.block_out_channels) != tuple(unet.block_out_channels):
            raise ValueError(f"controlnet: expected block_out_channels {tuple(unet.block_out_channels)} (the UNet's), "
                             f"got {tuple(net.block_out_channels)}")
        if net.conditioning_channels != 3:
            raise ValueError(f"controlnet: expected conditioning_channels 3 (the source RGB), got "
                             f"{net.conditioning_channels}")
        factor = 2 ** (len(net.conditioning_embedding_out_channels) - 1)
        if factor != self.vae_scale_factor:
            widths = tuple(net.conditioning_embedding_out_channels)
            raise ValueError(f"controlnet: expected a conditioning embedding that downsamples by the VAE factor "
                             f"{self.vae_scale_factor}, got {factor} ({widths})")

    def _check_images(self, images: torch.Tensor, name: str) -> torch.Tensor:
        return check_images(images, name, self.vae_scale_factor)

    @torch.no_grad()
    def encode_target(self, targets: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator | None = None,
                      sample_posterior: bool = True) -> torch.Tensor:
        """Target tokens ``(1,N,4)``: VAE latents of the target(s) in [0, 1], scaled, one token per latent cell.

        Args:
            targets: a target image ``(3,H,W)``/``(B,3,H,W)`` (uint8 or float in [0, 1]) or a list
                of them; several images are pooled by concatenating their tokens.
            generator: draws the posterior sample (as StainFuser's ``latent_dist.sample()``); None
                uses ``torch.Generator().manual_seed(0)``.
            sample_posterior: False takes the posterior mean instead.

        Raises:
            ValueError: an empty list or a target whose size does not fit the VAE.
        """
        images = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        if not images:
            raise ValueError("target: expected at least one image, got an empty sequence")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected one torch.Generator for the target, got {type(generator).__name__}")
        tokens = []
        for i, image in enumerate(images):
            rgb = self._check_images(image, f"target[{i}]")
            # [0, 1] straight into the VAE, as published (no [-1, 1] mapping)
            dist = self.vae.encode(rgb.to(self._execution_device, self.vae.dtype)).latent_dist
            latents = (dist.sample(generator) if sample_posterior else dist.mean) * self.vae.config.scaling_factor
            b, c = latents.shape[:2]
            tokens.append(latents.reshape(b, c, -1).permute(0, 2, 1).reshape(1, -1, c))  # (B,h·w,C), pooled
        return torch.cat(tokens, 1)

    def check_inputs(self, rgb: torch.Tensor, target: object, target_tokens: torch.Tensor | None,
                     num_inference_steps: int, output_type: str, generator: GeneratorLike = None,
                     latents: torch.Tensor | None = None) -> None:
        """Validate everything before any compute is spent (one-line ``ValueError`` naming the argument)."""
        self.check_components()
        if (target is None) == (target_tokens is None):
            raise ValueError("target: expected exactly one of target (an image) or target_tokens (from encode_target), "
                             f"got {'both' if target is not None else 'neither'}")
        c = self.token_dim
        if target_tokens is not None:
            if not isinstance(target_tokens, torch.Tensor):
                raise ValueError(f"target_tokens: expected a tensor from encode_target, got "
                                 f"{type(target_tokens).__name__}")
            if (target_tokens.ndim != 3 or target_tokens.shape[-1] != c or target_tokens.shape[1] < 1
                    or target_tokens.shape[0] not in (1, rgb.shape[0])):
                raise ValueError(f"target_tokens: expected (1 or B,N,{c}) from encode_target, got "
                                 f"{tuple(target_tokens.shape)}")
            check_conditioning(target_tokens, "target_tokens")
        elif isinstance(generator, list):
            raise ValueError("generator: expected one torch.Generator when target is an image (its posterior sample "
                             "is drawn first), got a list; pass target_tokens from encode_target instead")
        check_steps(num_inference_steps)
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
        check_generator(generator, rgb.shape[0])
        if latents is not None:
            f = self.vae_scale_factor
            shape = (c, rgb.shape[-2] // f, rgb.shape[-1] // f)
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[1:]) != shape \
                    or latents.shape[0] not in (1, rgb.shape[0]):
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents: expected initial noise of shape (1 or B,{c},{shape[1]},{shape[2]}), "
                                 f"got {got}")
            check_conditioning(latents, "latents")

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        target: torch.Tensor | Sequence[torch.Tensor] | None = None,
        target_tokens: torch.Tensor | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        generator: GeneratorLike = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> StainFuserPipelineOutput | tuple:
        """Restain ``images`` (sources) in the stain of ``target`` (or of precomputed ``target_tokens``).

        Args:
            images: source tiles ``(B,3,H,W)``/``(3,H,W)``, uint8 or float in [0, 1]; H and W
                multiples of the VAE factor (8; StainFuser was trained on 512-px tiles).
            target: the target image(s); encoded first, its posterior sample drawn from ``generator``
                before the initial noise (the published order).
            target_tokens: tokens from :meth:`encode_target` (encode once, reuse for every batch).
            num_inference_steps: PNDM steps (20, as published).
            generator: a generator (one noise draw shared by every tile: batch-invariant), a list
                with one per tile (only with ``target_tokens``), or None (seed 0).
            latents: initial noise ``(1 or B,4,H/8,W/8)`` instead of a draw (as diffusers pipelines).
            output_type: ``"pt"`` (images in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`StainFuserPipelineOutput` (else a tuple).

        Returns:
            :class:`StainFuserPipelineOutput` (``images``, ``target_tokens``) or ``(images, target_tokens)``.

        Raises:
            ValueError: bad images, target, tokens, steps, noise or generator (before any compute).
        """
        # 1. check inputs
        rgb = self._check_images(images, "images")
        self.check_inputs(rgb, target, target_tokens, num_inference_steps, output_type, generator, latents)
        device, batch = self._execution_device, rgb.shape[0]
        if generator is None:
            generator = torch.Generator().manual_seed(0)

        # 2. target tokens (B,h·w,4); the ControlNet's projector applied here (diffusers' ControlNet does not)
        if target_tokens is None:
            target_tokens = self.encode_target(target, generator)  # type: ignore[arg-type]
        tokens = target_tokens.to(device, self.unet.dtype).expand(batch, -1, -1)
        control_tokens = self.controlnet.encoder_hid_proj(tokens.to(self.controlnet.dtype))
        condition = rgb.to(device, self.controlnet.dtype)  # the source RGB in [0, 1]

        # 3. timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. initial noise: one draw shared by every tile
        f = self.vae_scale_factor
        shape = (batch, self.token_dim, rgb.shape[-2] // f, rgb.shape[-1] // f)
        if latents is None:
            latents = shared_noise(shape, generator, device, self.unet.dtype)
        latents = latents.to(device, self.unet.dtype).expand(shape) * self.scheduler.init_noise_sigma

        # 5. denoise: ControlNet residuals + UNet epsilon, PNDM steps
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(latents, t)
            down, mid = self.controlnet(model_in.to(self.controlnet.dtype), t, encoder_hidden_states=control_tokens,
                                        controlnet_cond=condition, return_dict=False)
            noise_pred = self.unet(model_in, t, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                                   mid_block_additional_residual=mid).sample
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        # 6. decode, [-1, 1] -> [0, 1]
        if output_type == "latent":
            out = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            out = (decoded.float().clamp(-1, 1) + 1) / 2
        self.maybe_free_model_hooks()
        if not return_dict:
            return (out, target_tokens)
        return StainFuserPipelineOutput(images=out, target_tokens=target_tokens)
