"""MaskToImagePipeline: nuclei masks (layout) + optional SSL embeddings (style) in, H&E tiles out.

A diffusers ``ControlNetModel`` made from the embedding-conditioned LDM's UNet
(``ControlNetModel.from_unet``: a trainable copy of the encoder half with zero-initialised
output convolutions) reads the mask's conditioning image (:func:`~genpath.masks.masks_to_conditioning`)
and adds residuals to the frozen UNet. The embedding tokens set style and context; without
embeddings the learned null tokens are used (unconditional style).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

from genpath.masks import check_masks, conditioning_channels, masks_to_conditioning
from genpath.models.conditioning import EmbeddingProjector
from genpath.models.vae import decode_tiled, downsampling_factor


def controlnet_from_unet(unet: UNet2DConditionModel, vae_factor: int, num_types: int) -> ControlNetModel:
    """Build a ControlNet initialised from ``unet`` whose conditioning embedding downsamples by ``vae_factor``."""
    stages = int(round(math.log2(vae_factor)))
    if 2**stages != vae_factor:
        raise ValueError(f"vae_factor: expected a power of two, got {vae_factor}")
    widths = tuple(16 * 2**i for i in range(stages + 1))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                     conditioning_channels=conditioning_channels(num_types))


class MaskToImagePipeline(DiffusionPipeline):
    """Generate tiles whose nuclei follow instance/type masks.

    Components: ``vae``, ``unet`` and ``projector`` (from an
    :class:`~genpath.pipelines.EmbeddingToImagePipeline`), ``controlnet`` and a diffusers
    ``scheduler``; config ``num_types`` (nucleus classes in the type maps).

    Example:
        >>> out = pipe(instances, types, embeddings=emb, controlnet_conditioning_scale=1.0).images  # doctest: +SKIP
    """

    model_cpu_offload_seq = "projector->controlnet->unet->vae"

    def __init__(
        self, vae: AutoencoderKL, unet: UNet2DConditionModel, projector: EmbeddingProjector,
        controlnet: ControlNetModel, scheduler: KarrasDiffusionSchedulers, num_types: int = 0,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, unet=unet, projector=projector, controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(num_types=int(num_types))

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    def check_inputs(self, instances: torch.Tensor, types: torch.Tensor | None, embeddings: torch.Tensor | None,
                     num_inference_steps: int, guidance_scale: float, scale: float) -> tuple[torch.Tensor, ...]:
        """Validate everything before any compute is spent; returns int64 ``(B,H,W)`` maps."""
        k = self.config.num_types
        inst, typ = check_masks(instances, types, k, "instances")
        expected = conditioning_channels(k)
        if self.controlnet.config.conditioning_channels != expected:
            raise ValueError(f"controlnet: expected {expected} conditioning channels for {k} nucleus types, "
                             f"got {self.controlnet.config.conditioning_channels}")
        f = self.vae_scale_factor
        if inst.shape[-2] % f or inst.shape[-1] % f:
            raise ValueError(f"instances: expected height and width divisible by the VAE factor {f}, "
                             f"got {inst.shape[-2]}x{inst.shape[-1]}")
        if embeddings is not None:
            self.projector.check_embeddings(embeddings)
            if embeddings.shape[0] != inst.shape[0]:
                raise ValueError(f"embeddings: expected one per mask ({inst.shape[0]}), got {embeddings.shape[0]}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        if guidance_scale < 0 or scale < 0:
            raise ValueError(
                f"guidance_scale/controlnet_conditioning_scale: expected >= 0, got {guidance_scale}/{scale}"
            )
        return inst, typ

    @torch.no_grad()
    def __call__(
        self,
        instances: torch.Tensor,
        types: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
    ):  # noqa: ANN204 - an ImagePipelineOutput
        """Generate one tile per mask.

        Args:
            instances: integer instance maps ``(B,H,W)``/``(H,W)``.
            types: integer type maps (0 background, 1..num_types) or None.
            embeddings: ``(B,D)`` style embeddings; None uses the null tokens (no guidance).
            controlnet_conditioning_scale: weight of the mask residuals (0 ignores the mask).
            guidance_scale: classifier-free guidance on the embedding (only with embeddings).
            num_inference_steps: scheduler steps.
            generator: torch generator(s) for the initial noise.
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]) or ``"latent"``.

        Returns:
            An object with ``.images``.
        """
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        # 1. checks
        inst, typ = self.check_inputs(instances, types, embeddings, num_inference_steps, guidance_scale,
                                      controlnet_conditioning_scale)
        if output_type not in ("pt", "latent"):
            raise ValueError(f"output_type: expected 'pt' or 'latent', got {output_type!r}")
        device, batch, f = self._execution_device, inst.shape[0], self.vae_scale_factor

        # 2. conditioning image and tokens
        cond_image = masks_to_conditioning(inst, typ, self.config.num_types).to(device, self.controlnet.dtype)
        do_cfg = embeddings is not None and guidance_scale != 1.0
        if embeddings is None:
            tokens = self.projector.null_tokens(batch).to(device, self.unet.dtype)
        else:
            tokens = self.projector(embeddings.to(device))
            if do_cfg:
                tokens = torch.cat([self.projector.null_tokens(batch).to(tokens), tokens])
                cond_image = torch.cat([cond_image] * 2)

        # 3. noise and timesteps
        shape = (batch, self.unet.config.in_channels, inst.shape[-2] // f, inst.shape[-1] // f)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=tokens.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma

        # 4. denoising with ControlNet residuals
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            down, mid = self.controlnet(model_in, t, encoder_hidden_states=tokens, controlnet_cond=cond_image,
                                        conditioning_scale=controlnet_conditioning_scale, return_dict=False)
            noise = self.unet(model_in, t, encoder_hidden_states=tokens, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
            if do_cfg:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise, t, latents).prev_sample

        # 5. decode
        if output_type == "latent":
            return ImagePipelineOutput(images=latents)
        return ImagePipelineOutput(images=decode_tiled(self.vae, latents))


def load_mask_pipeline(path: str | Path) -> MaskToImagePipeline:
    """Load a MaskToImagePipeline: a full ``save_pretrained`` folder, or a ControlNet-only folder.

    A ControlNet-only folder (how ControlNets are usually shipped, apart from their base model)
    holds the ``ControlNetModel`` weights and ``base.json`` with ``{"pipeline": <the LDM folder,
    relative to this one>, "num_types": K}``; the base pipeline supplies VAE, UNet, projector and
    scheduler. Weights load as float32 (shipped checkpoints are fp16).
    """
    import json

    from genpath.synth import load_pipeline

    folder = Path(path)
    if (folder / "model_index.json").is_file():
        pipe = MaskToImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    elif (folder / "base.json").is_file():
        spec = json.loads((folder / "base.json").read_text())
        base_dir = folder / spec["pipeline"] if not Path(spec["pipeline"]).is_absolute() else Path(spec["pipeline"])
        base = load_pipeline(base_dir)
        controlnet = ControlNetModel.from_pretrained(str(folder), torch_dtype=torch.float32)
        pipe = MaskToImagePipeline(vae=base.vae, unet=base.unet, projector=base.projector, controlnet=controlnet,
                                   scheduler=base.scheduler, num_types=int(spec.get("num_types", 0)))
    else:
        raise FileNotFoundError(f"model: expected a MaskToImagePipeline folder (model_index.json) or a ControlNet "
                                f"folder with base.json, got {folder}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def export_controlnet(pipeline: str | Path, base: str | Path, destination: str | Path) -> Path:
    """Write the ControlNet of a trained pipeline as fp16 safetensors + ``base.json`` (relative to ``base``)."""
    import json
    import os
    import shutil

    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = MaskToImagePipeline.from_pretrained(str(pipeline), torch_dtype=torch.float32)
    pipe.controlnet.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    relative = os.path.relpath(Path(base).resolve(), destination.resolve())
    (tmp / "base.json").write_text(json.dumps({"pipeline": relative, "num_types": pipe.config.num_types}, indent=1))
    if (Path(pipeline) / "encoder.json").is_file():
        from genpath.encoders.reference import copy_encoder_reference

        copy_encoder_reference(pipeline, tmp)  # tmp and destination are siblings: same relative paths
    shutil.rmtree(destination, ignore_errors=True)
    tmp.rename(destination)
    return destination
