"""MaskToImagePipeline: nuclei masks (layout) + optional SSL embeddings (style) in, H&E tiles out.

A diffusers ``ControlNetModel`` made from the embedding-conditioned LDM's UNet
(``ControlNetModel.from_unet``: a trainable copy of the encoder half with zero-initialised
output convolutions) reads the mask's conditioning image (:func:`~genpath.masks.masks_to_conditioning`)
and adds residuals to the frozen UNet. The embedding tokens set style and context; without
embeddings the learned null tokens are used (unconditional style).

Two folder layouts load through the same ``MaskToImagePipeline.from_pretrained``: a full
``save_pretrained`` folder, or a ControlNet shipped apart from its base model (ControlNet
weights + ``base.json``, written by :func:`export_controlnet`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput

from genpath.encoders.reference import copy_encoder_reference, resolve_inside
from genpath.masks import check_masks, conditioning_channels, masks_to_conditioning
from genpath.models.conditioning import EmbeddingProjector
from genpath.models.vae import decode_tiled, downsampling_factor
from genpath.pipelines.checks import check_conditioning, check_mask_sampling
from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline, check_latent_components
from genpath.pipelines.loading import ARGUMENT, GenpathPipelineMixin, check_pretrained_folder
from genpath.pipelines.noise import GeneratorLike, initial_latents
from genpath.utils.atomic import atomic_directory
from genpath.utils.logging import get_logger

logger = get_logger(__name__)


def controlnet_from_unet(unet: UNet2DConditionModel, vae_factor: int, num_types: int) -> ControlNetModel:
    """Build a ControlNet initialised from ``unet`` whose conditioning embedding downsamples by ``vae_factor``."""
    stages = int(round(math.log2(vae_factor)))
    if 2**stages != vae_factor:
        raise ValueError(f"vae_factor: expected a power of two, got {vae_factor}")
    widths = tuple(16 * 2**i for i in range(stages + 1))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                     conditioning_channels=conditioning_channels(num_types))


@dataclass
class MaskToImagePipelineOutput(BaseOutput):
    """Output of :class:`MaskToImagePipeline`.

    Attributes:
        images: float ``(B,3,H,W)`` in [0, 1] (``"pt"``) or the final latents (``"latent"``).
    """

    images: torch.Tensor


class MaskToImagePipeline(GenpathPipelineMixin, DiffusionPipeline):
    """Generate tiles whose nuclei follow instance/type masks.

    Components: ``vae``, ``unet`` and ``projector`` (from an
    :class:`~genpath.pipelines.EmbeddingToImagePipeline`), ``controlnet`` and a diffusers
    ``scheduler``; config ``num_types`` (nucleus classes in the type maps).

    Example:
        >>> pipe = MaskToImagePipeline.from_pretrained("samples/checkpoints/controlnet_hgsc")  # doctest: +SKIP
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

    @classmethod
    def _load_folder(cls, folder: Path, dtype: torch.dtype, disable_progress_bar: bool = True,
                     **kwargs: Any) -> MaskToImagePipeline:
        """Load a full pipeline folder, or a ControlNet folder composed with its base LDM.

        ``base.json`` holds ``{"pipeline": <where the base was>, "num_types": K,
        "base_fingerprint": <sha256 of the base UNet's weights>}``; the base supplies VAE, UNet,
        projector and scheduler. A model folder is untrusted: ``pipeline`` is followed only when
        it lies *inside* this folder; otherwise the caller passes ``base=`` (``--base``), which
        is checked against the fingerprint, so a ControlNet is never composed with the wrong LDM.
        """
        if (folder / "model_index.json").is_file():
            if kwargs.pop("base", None) is not None:
                raise ValueError(f"base: expected only with a ControlNet-only folder, got a full pipeline in {folder}")
            return super()._load_folder(folder, dtype=dtype, disable_progress_bar=disable_progress_bar, **kwargs)
        record = folder / "base.json"
        if not record.is_file():
            raise FileNotFoundError(f"{ARGUMENT}: expected a MaskToImagePipeline folder (model_index.json) or a "
                                    f"ControlNet folder with base.json, got {folder}")
        base_arg = kwargs.pop("base", None)
        unknown = sorted(set(kwargs) - {"scheduler"})
        if unknown:
            raise ValueError(f"kwargs: expected at most base= and scheduler= for a ControlNet folder, got {unknown}")
        if not (folder / "config.json").is_file():
            raise ValueError(f"{ARGUMENT}: expected the ControlNet's config.json next to base.json, "
                             f"got none in {folder}")
        spec = _read_base_record(record)
        if base_arg is not None:
            base_dir = check_pretrained_folder(base_arg, "base", "EmbeddingToImagePipeline folder")
        else:
            try:
                base_dir = resolve_inside(folder, spec["pipeline"], "base.json pipeline")
            except ValueError:
                raise ValueError(f"base: expected the base EmbeddingToImagePipeline folder given explicitly (base= / "
                                 f"--base): {record} names {spec['pipeline']!r}, outside the ControlNet folder, and "
                                 "genpath never follows a model folder's paths outside it") from None
            base_dir = check_pretrained_folder(base_dir, "base.json pipeline", "EmbeddingToImagePipeline folder")
        expected = spec.get("base_fingerprint")
        if expected is not None and base_fingerprint(base_dir) != expected:
            raise ValueError(f"base: expected the LDM this ControlNet was trained on (fingerprint {expected[:12]}), "
                             f"got {base_dir} (fingerprint {base_fingerprint(base_dir)[:12]})")
        base = EmbeddingToImagePipeline.from_pretrained(base_dir, dtype=dtype,
                                                        disable_progress_bar=disable_progress_bar)
        controlnet = ControlNetModel.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
        logger.debug("composed a MaskToImagePipeline from the ControlNet %s and the base %s", folder, base_dir)
        return cls(vae=base.vae, unet=base.unet, projector=base.projector, controlnet=controlnet,
                   scheduler=kwargs.get("scheduler", base.scheduler), num_types=int(spec.get("num_types", 0)))

    def check_components(self) -> None:
        """Raise a ``ValueError`` when the parts do not fit together (a mismatched checkpoint)."""
        check_latent_components(self.vae, self.unet, self.projector)
        k = self.config.num_types
        expected = conditioning_channels(k)
        if self.controlnet.config.conditioning_channels != expected:
            raise ValueError(f"controlnet: expected {expected} conditioning channels for {k} nucleus types, "
                             f"got {self.controlnet.config.conditioning_channels}")

    def check_inputs(self, instances: torch.Tensor, types: torch.Tensor | None, embeddings: torch.Tensor | None,
                     num_inference_steps: int, guidance_scale: float, scale: float, output_type: str = "pt",
                     generator: GeneratorLike = None) -> tuple[torch.Tensor, ...]:
        """Validate everything before any compute is spent; returns int64 ``(B,H,W)`` maps."""
        self.check_components()
        inst, typ = check_masks(instances, types, self.config.num_types, "instances")
        f = self.vae_scale_factor
        if inst.shape[-2] % f or inst.shape[-1] % f:
            raise ValueError(f"instances: expected height and width divisible by the VAE factor {f}, "
                             f"got {inst.shape[-2]}x{inst.shape[-1]}")
        if embeddings is not None:
            self.projector.check_embeddings(embeddings)
            check_conditioning(embeddings, "embeddings")
        check_mask_sampling(embeddings, inst.shape[0], num_inference_steps, guidance_scale, scale, output_type,
                            generator)
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
        generator: GeneratorLike = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> MaskToImagePipelineOutput | tuple:
        """Generate one tile per mask.

        Args:
            instances: integer instance maps ``(B,H,W)``/``(H,W)``.
            types: integer type maps (0 background, 1..num_types) or None.
            embeddings: ``(B,D)`` style embeddings; None uses the null tokens (no guidance).
            controlnet_conditioning_scale: weight of the mask residuals (0 ignores the mask).
            guidance_scale: classifier-free guidance on the embedding (only with embeddings).
            num_inference_steps: scheduler steps.
            generator: torch generator(s) for the initial noise (a list: one per mask).
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`MaskToImagePipelineOutput` (else a tuple ``(images,)``).

        Returns:
            A :class:`MaskToImagePipelineOutput` with ``.images``.
        """
        # 1. checks
        inst, typ = self.check_inputs(instances, types, embeddings, num_inference_steps, guidance_scale,
                                      controlnet_conditioning_scale, output_type, generator)
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
        latents = initial_latents(self.scheduler, num_inference_steps, shape, None, generator, device, tokens.dtype)

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
        images = latents if output_type == "latent" else decode_tiled(self.vae, latents)
        if not return_dict:
            return (images,)
        return MaskToImagePipelineOutput(images=images)


def base_fingerprint(base: str | Path) -> str:
    """SHA-256 of a base LDM's UNet weights: identifies the base a ControlNet was trained on."""
    import hashlib

    weights = sorted((Path(base) / "unet").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"base: expected unet/*.safetensors in {base}, got none")
    digest = hashlib.sha256()
    for file in weights:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_base_record(record: Path) -> dict[str, Any]:
    try:
        spec = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{ARGUMENT}: expected JSON in {record}, got a parse error ({error})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("pipeline"), str):
        raise ValueError(f"{ARGUMENT}: expected a 'pipeline' entry in {record}, got {spec!r:.80}")
    if not isinstance(spec.get("num_types", 0), int) or not 0 <= spec.get("num_types", 0) <= 64:
        raise ValueError(f"{ARGUMENT}: expected 'num_types' an integer in 0..64 in {record}, got {spec['num_types']!r}")
    return spec


def export_controlnet(pipeline: str | Path, base: str | Path, destination: str | Path) -> Path:
    """Write the ControlNet of a trained pipeline as fp16 safetensors + ``base.json`` (a hint and a fingerprint).

    The folder is written atomically (it appears complete or not at all) and loads with
    ``MaskToImagePipeline.from_pretrained(destination, base=base)`` (``base`` may be left out
    only when it lies inside ``destination``).
    """
    destination = Path(destination)
    pipe = MaskToImagePipeline.from_pretrained(pipeline)
    relative = os.path.relpath(Path(base).resolve(), destination.resolve())
    record = {"pipeline": relative, "num_types": pipe.config.num_types, "base_fingerprint": base_fingerprint(base)}
    with atomic_directory(destination) as tmp:
        pipe.controlnet.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "base.json").write_text(json.dumps(record, indent=1))
        if (Path(pipeline) / "encoder.json").is_file():
            copy_encoder_reference(pipeline, tmp)
    return destination
