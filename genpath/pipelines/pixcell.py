"""PixCellPipeline: PixCell-256 / PixCell-1024 (UNI2-h-conditioned PixArt-Σ) from their published folders.

PixCell (Yellapragada et al. 2025, ``StonyBrook-CVLab/PixCell-256`` and ``-1024``) is a PixArt-Σ
XL/2 diffusion transformer over SD3.5-VAE latents (16 channels), conditioned on UNI2-h
embeddings instead of text. Its hub folders name a custom pipeline file; genpath loads them with
its own class of the same name and the *stock* diffusers ``PixArtTransformer2DModel``, never
importing a file of the folder:

* ``transformer/``: ``config.json`` (``_class_name`` ``PixCellTransformer2DModel``, PixArt keys plus
  ``caption_num_tokens``) and ``diffusion_pytorch_model.safetensors``: PixArt weights in diffusers
  naming plus two persistent buffers of PixCell's module, ``caption_projection.uncond_embedding``
  ``(T, 1536)`` (the learned unconditional UNI embedding, used for guidance) and, for ``T > 1``,
  ``y_pos_embed.y_pos_embed`` ``(1, T, 1536)`` (a 2-D sin-cos embedding *added to the UNI tokens
  before the caption projection*, conditional and unconditional alike). genpath takes both out of
  the file and adds the positions itself, so the diffusers transformer sees exactly what
  PixCell's forward computes;
* ``scheduler/``: a diffusers scheduler (DPM-Solver multistep);
* ``vae/``: only ``config.json``: the SD3.5 VAE weights are not redistributed. Pass the VAE folder
  (``vae=`` / ``--vae``); its ``latent_channels``, ``scaling_factor`` and ``shift_factor`` must match
  that config. Latents are ``(z - shift_factor) * scaling_factor``.

Conditioning: ``T = 1`` UNI2-h token for PixCell-256 (one 256-px tile), ``T = 16`` for
PixCell-1024: the embeddings of the 4x4 grid of 256-px crops of a 1024-px image, row-major
(:func:`crop_grid`, :func:`pixcell_tokens`). The transformer predicts noise and variance
(learned sigma, 32 channels); the first 16 channels are the noise.

Example:
    >>> pipe = PixCellPipeline.from_pretrained("models/PixCell-256", vae="models/sd3.5-vae")  # doctest: +SKIP
    >>> out = pipe(uni_embeddings, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from diffusers.utils import BaseOutput

from genpath.models.vae import decode_tiled, downsampling_factor
from genpath.pipelines.checks import MAX_GUIDANCE, check_conditioning, check_number, check_size, check_steps
from genpath.pipelines.loading import GenpathPipelineMixin
from genpath.pipelines.noise import GeneratorLike, check_generator, initial_latents
from genpath.pipelines.pixcell_loading import (
    PIXCELL_TRANSFORMERS,
    SD35_VAE,
    caption_pos_embed,
    load_pixcell_transformer,
    load_pixcell_vae,
    load_scheduler,
)

__all__ = ["PixCellPipeline", "PixCellPipelineOutput", "caption_pos_embed", "crop_grid", "pixcell_tokens"]
OUTPUT_TYPES = ("pt", "np", "latent")


def crop_grid(images: torch.Tensor, side: int) -> torch.Tensor:
    """Cut each image into a ``side x side`` grid of equal crops, row-major: ``(B*side*side, 3, H/side, W/side)``.

    Example:
        >>> x = torch.arange(16.).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
        >>> crop_grid(x, 2)[:, 0, 0, 0].tolist()  # top-left pixel of each crop: row 0 then row 1
        [0.0, 2.0, 8.0, 10.0]
    """
    b, c, h, w = images.shape
    if h % side or w % side:
        raise ValueError(f"images: expected height and width divisible by the {side}x{side} token grid, got {h}x{w}")
    crops = images.reshape(b, c, side, h // side, side, w // side).permute(0, 2, 4, 1, 3, 5)
    return crops.reshape(b * side * side, c, h // side, w // side)


def pixcell_tokens(encoder: Any, images: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """UNI tokens ``(B, T, D)`` of images: one embedding per crop of a row-major ``sqrt(T)`` grid.

    PixCell-1024 (``T = 16``) embeds the 4x4 grid of 256-px crops of a 1024-px image; PixCell-256
    (``T = 1``) the whole tile. ``encoder`` maps ``(N,3,h,w)`` images to ``(N, D)`` (the ``uni2-h`` preset).
    """
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"num_tokens: expected a square number of UNI tokens, got {num_tokens}")
    embeddings = encoder(crop_grid(images, side) if side > 1 else images)
    return embeddings.reshape(images.shape[0], num_tokens, -1)


@dataclass
class PixCellPipelineOutput(BaseOutput):
    """Output of :class:`PixCellPipeline`.

    Attributes:
        images: float ``(B,3,H,W)`` in [0, 1] (``"pt"``), a ``(B,H,W,3)`` array (``"np"``) or the
            final latents ``(B,16,h,w)`` (``"latent"``).
    """

    images: Any


class PixCellPipeline(GenpathPipelineMixin, DiffusionPipeline):
    """PixCell: tiles from UNI2-h embeddings, with guidance by the stored unconditional embedding.

    Components: ``vae`` (the SD3.5 ``AutoencoderKL``), ``transformer`` (diffusers'
    ``PixArtTransformer2DModel``), ``scheduler``; plus ``uncond_embedding`` ``(T, D)`` and
    ``token_positions`` ``(1, T, D)`` (None for ``T = 1``) taken from the transformer's weights.
    ``from_pretrained(folder, vae=VAE_DIR)`` loads a published folder (see the module doc).
    """

    model_cpu_offload_seq = "transformer->vae"
    published_components = {"transformer": PIXCELL_TRANSFORMERS}

    def __init__(self, vae: AutoencoderKL, transformer: PixArtTransformer2DModel, scheduler: Any,
                 uncond_embedding: torch.Tensor | None = None, token_positions: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, scheduler=scheduler)
        self.uncond_embedding = uncond_embedding
        self.token_positions = token_positions

    @property
    def vae_scale_factor(self) -> int:
        return downsampling_factor(self.vae)

    @property
    def num_tokens(self) -> int:
        """UNI tokens per image: 1 (PixCell-256) or 16 (PixCell-1024)."""
        return int(self.uncond_embedding.shape[0])

    @property
    def default_size(self) -> int:
        """Output side in pixels the transformer was trained at (256 or 1024)."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def cell_size(self) -> int:
        """Pixels of the crop each UNI token describes (256 for both published models)."""
        return self.default_size // math.isqrt(self.num_tokens)

    @classmethod
    def _load_folder(cls, folder: Path, dtype: torch.dtype, disable_progress_bar: bool = True,
                     **kwargs: Any) -> PixCellPipeline:
        """Load a published PixCell folder (``vae=`` the SD3.5 VAE; optional ``scheduler=``)."""
        spec, target = cls._index_and_class(folder)
        unknown = sorted(set(kwargs) - {"vae", "scheduler"})
        if unknown:
            raise ValueError(f"kwargs: expected at most vae= and scheduler= for a PixCell folder, got {unknown}")
        target._check_index(folder, spec, provided={k for k in ("vae", "scheduler") if kwargs.get(k) is not None})
        return target._load_parts(folder, dtype, kwargs.get("vae"), kwargs.get("scheduler"))

    @classmethod
    def _load_parts(cls, folder: Path, dtype: torch.dtype, vae: Any, scheduler: Any) -> PixCellPipeline:
        transformer, uncond, positions = load_pixcell_transformer(folder / "transformer", dtype)
        return cls(vae=load_pixcell_vae(folder, vae, dtype), transformer=transformer,
                   scheduler=scheduler if scheduler is not None else load_scheduler(folder / "scheduler"),
                   uncond_embedding=uncond, token_positions=positions)

    def check_components(self) -> None:
        """Raise a one-line ``ValueError`` when the parts do not fit together."""
        c, cfg = self.vae.config.latent_channels, self.transformer.config
        if cfg.in_channels != c or cfg.out_channels not in (c, 2 * c):
            raise ValueError(f"vae: expected {cfg.in_channels} latent channels like the transformer's input "
                             f"({SD35_VAE}), got {c} (transformer in/out {cfg.in_channels}/{cfg.out_channels})")
        if self.uncond_embedding is None or self.uncond_embedding.ndim != 2 or \
                self.uncond_embedding.shape[1] != cfg.caption_channels:
            raise ValueError(f"uncond_embedding: expected (T, {cfg.caption_channels}), got "
                             f"{None if self.uncond_embedding is None else tuple(self.uncond_embedding.shape)}")
        t = self.num_tokens
        if math.isqrt(t) ** 2 != t or (t > 1) != (self.token_positions is not None):
            got = None if self.token_positions is None else tuple(self.token_positions.shape)
            raise ValueError(f"token_positions: expected (1, {t}, D) positions for {t} tokens (a square grid; "
                             f"none for 1), got {got}")

    def check_embeddings(self, embeddings: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
        """Return UNI embeddings as ``(B, T, D)`` (``(B, D)`` is accepted for ``T = 1``); else a ``ValueError``."""
        t, d = self.num_tokens, self.transformer.config.caption_channels
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        what = ("one UNI2-h token per tile" if t == 1 else
                f"{t} UNI2-h tokens: a {math.isqrt(t)}x{math.isqrt(t)} row-major grid of {self.cell_size}-px crops")
        if isinstance(embeddings, torch.Tensor) and embeddings.ndim == 2 and t == 1:
            embeddings = embeddings[:, None]
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3 or embeddings.shape[1:] != (t, d) or \
                embeddings.shape[0] == 0:
            raise ValueError(f"{name}: expected (B, {t}, {d}) for this PixCell model ({what}), got {shape}")
        check_conditioning(embeddings, name)
        return embeddings

    def check_inputs(self, embeddings: torch.Tensor, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, output_type: str = "pt", generator: GeneratorLike = None) -> torch.Tensor:
        """Validate everything before any compute is spent; returns the embeddings as ``(B, T, D)``."""
        self.check_components()
        embeddings = self.check_embeddings(embeddings)
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        check_size(height, "height", multiple, "the VAE factor x patch size")
        check_size(width, "width", multiple, "the VAE factor x patch size")
        check_steps(num_inference_steps)
        check_number(guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE, "1 = no guidance")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: expected pt, np or latent, got {output_type!r}")
        check_generator(generator, embeddings.shape[0])
        return embeddings

    def encode_tokens(self, embeddings: torch.Tensor, guidance: bool) -> torch.Tensor:
        """Build the ``encoder_hidden_states``: tokens plus positions, ``[uncond; cond]`` with guidance."""
        device, dtype = self._execution_device, self.transformer.dtype
        tokens = embeddings.to(device, dtype)
        if guidance:
            tokens = torch.cat([self.uncond_embedding.to(device, dtype).expand_as(tokens), tokens])
        if self.token_positions is not None:
            tokens = tokens + self.token_positions.to(device, dtype)
        return tokens

    def added_conditions(self, batch: int, height: int, width: int) -> dict[str, torch.Tensor | None]:
        """PixArt's resolution / aspect-ratio micro-conditions (None unless the transformer uses them)."""
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        device, dtype = self._execution_device, self.transformer.dtype
        return {"resolution": torch.tensor([height, width], device=device, dtype=dtype).repeat(batch, 1),
                "aspect_ratio": torch.tensor([height / width], device=device, dtype=dtype).repeat(batch, 1)}

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, guidance_scale: float,
                      **transformer_kwargs: Any) -> torch.Tensor:
        """One guided noise prediction (the first ``C`` channels of the learned-sigma output)."""
        guided = tokens.shape[0] == 2 * latents.shape[0]
        model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        h, w = (s * self.vae_scale_factor for s in latents.shape[-2:])
        out = self.transformer(model_in, encoder_hidden_states=tokens,
                               timestep=t.reshape(-1)[:1].to(model_in.device).expand(model_in.shape[0]),
                               added_cond_kwargs=self.added_conditions(model_in.shape[0], h, w),
                               return_dict=False, **transformer_kwargs)[0]
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out[:, : latents.shape[1]]  # learned sigma: keep the noise channels

    def decode(self, latents: torch.Tensor, output_type: str, decode_tile: int | None = None) -> Any:
        """Decode final latents (``z = latents / scaling_factor + shift_factor``) to the requested output."""
        if output_type == "latent":
            return latents
        images = decode_tiled(self.vae, latents, tile=decode_tile)
        return images.permute(0, 2, 3, 1).cpu().numpy() if output_type == "np" else images

    @torch.no_grad()
    def __call__(
        self,
        embeddings: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: GeneratorLike = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        decode_tile: int | None = None,
        return_dict: bool = True,
    ) -> PixCellPipelineOutput | tuple:
        """Generate one image per embedding.

        Args:
            embeddings: UNI2-h tokens ``(B, T, D)`` (``(B, D)`` for PixCell-256).
            height: output height in pixels (default: 256 or 1024, the training size).
            width: output width in pixels (same default).
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance against the stored unconditional embedding
                (1 = no guidance, no unconditional pass).
            generator: torch generator(s) for the initial noise (a list: one per image, so an
                image does not depend on its batch); None draws fresh noise.
            latents: initial noise ``(B,16,h,w)`` instead of sampling it.
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]), ``"np"`` or ``"latent"``.
            decode_tile: decode in blended tiles of this many pixels (large images).
            return_dict: return a :class:`PixCellPipelineOutput` (else a tuple ``(images,)``).

        Returns:
            A :class:`PixCellPipelineOutput` with ``.images``.
        """
        # 1. defaults and checks
        height, width = height or self.default_size, width or self.default_size
        embeddings = self.check_inputs(embeddings, height, width, num_inference_steps, guidance_scale, output_type,
                                       generator)
        device, batch, f = self._execution_device, embeddings.shape[0], self.vae_scale_factor

        # 2. conditioning tokens (+ the stored unconditional embedding for guidance), with positions
        tokens = self.encode_tokens(embeddings, guidance_scale != 1.0)

        # 3. initial noise and timesteps
        shape = (batch, self.transformer.config.in_channels, height // f, width // f)
        latents = initial_latents(self.scheduler, num_inference_steps, shape, latents, generator, device,
                                  tokens.dtype)

        # 4. denoising loop
        for t in self.progress_bar(self.scheduler.timesteps):
            noise = self.predict_noise(latents, t, tokens, guidance_scale)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]

        # 5. decode
        images = self.decode(latents, output_type, decode_tile)
        if not return_dict:
            return (images,)
        return PixCellPipelineOutput(images=images)
