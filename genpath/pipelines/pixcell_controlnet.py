"""PixCell's cell-mask ControlNet (``StonyBrook-CVLab/PixCell-256-Cell-ControlNet``) on genpath's PixCell pipeline.

The published folder holds ``controlnet/`` (``PixCellControlNet``), ``transformer/`` (PixCell-256
with residual inputs, ``PixCellTransformer2DModelControlNet``: the same weights as PixCell-256's
transformer), ``scheduler/`` and ``vae/``. Its ControlNet (PixCell's ``controlnet/pixcell_controlnet.py``,
rebuilt here from the same diffusers blocks so its safetensors load strictly) is a PixArt
transformer whose first ``n_controlnet_blocks`` blocks read the noisy latent plus a zero-initialised
patch embedding (``cond_pos_embed``) of the *VAE latent of the mask image*; a zero-initialised
``Linear`` after each block (``controlnet_blocks``) gives one residual per block, scaled by
``conditioning_scale``, which the base transformer adds to the output of block ``i``.

Mask conditioning as in PixCell's training code (``controlnet/train.py``): the binary nuclei mask
as an RGB image in [0, 1] (white nuclei), mapped to [-1, 1], encoded to the posterior mean, then
``(z - shift_factor) * scaling_factor``. With guidance both branches get the mask (diffusers'
ControlNet convention); without embeddings the stored unconditional UNI embedding is used and
guidance is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, PixArtTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormSingle

from genpath.masks import check_masks
from genpath.models.vae import encode_tiled
from genpath.pipelines.checks import check_mask_sampling
from genpath.pipelines.noise import GeneratorLike, initial_latents
from genpath.pipelines.pixcell import PixCellPipeline, PixCellPipelineOutput
from genpath.pipelines.pixcell_loading import (
    PIXCELL_TRANSFORMERS,
    build_from_config,
    cast,
    load_pixcell_transformer,
    load_pixcell_vae,
    load_scheduler,
    load_strict,
    read_json,
    read_weights,
)


class _TokenPositions(torch.nn.Module):
    """Holds PixCell's ``y_pos_embed`` buffer ``(1, T, D)`` under its published name."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("y_pos_embed", torch.zeros(1, num_tokens, dim))


class PixCellControlNet(ModelMixin, ConfigMixin):
    """PixCell's transformer ControlNet: module names and config keys as published (``PixCellControlNet``).

    ``forward`` returns one residual ``(B, N, inner_dim)`` per ControlNet block, times ``conditioning_scale``.
    ``norm_out``, ``scale_shift_table`` and ``proj_out`` exist because the published weights hold them
    (unused, as in PixCell's forward).
    """

    @register_to_config
    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: int | None = 8, num_layers: int = 28, dropout: float = 0.0, norm_num_groups: int = 32,
                 cross_attention_dim: int | None = 1152, attention_bias: bool = True, sample_size: int = 128,
                 patch_size: int = 2, activation_fn: str = "gelu-approximate", num_embeds_ada_norm: int | None = 1000,
                 upcast_attention: bool = False, norm_type: str = "ada_norm_single",
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: float | None = None, use_additional_conditions: bool | None = None,
                 caption_channels: int | None = None, caption_num_tokens: int = 1,
                 attention_type: str | None = "default", n_controlnet_blocks: int | None = 28) -> None:
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.use_additional_conditions = sample_size == 128 if use_additional_conditions is None \
            else use_additional_conditions
        scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)

        def patch_embed() -> PatchEmbed:
            return PatchEmbed(height=sample_size, width=sample_size, patch_size=patch_size, in_channels=in_channels,
                              embed_dim=inner, interpolation_scale=scale)

        self.pos_embed = patch_embed()
        blocks = num_layers if n_controlnet_blocks is None else min(num_layers, n_controlnet_blocks)
        self.transformer_blocks = torch.nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, dropout=dropout,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                                  upcast_attention=upcast_attention, norm_type=norm_type,
                                  norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                                  attention_type=attention_type)
            for _ in range(blocks)])
        self.y_pos_embed = _TokenPositions(caption_num_tokens, caption_channels) if caption_num_tokens > 1 else None
        self.norm_out = torch.nn.LayerNorm(inner, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = torch.nn.Parameter(torch.zeros(2, inner))
        self.proj_out = torch.nn.Linear(inner, patch_size * patch_size * (out_channels or in_channels))
        self.adaln_single = AdaLayerNormSingle(inner, use_additional_conditions=self.use_additional_conditions)
        self.caption_projection = PixArtAlphaTextProjection(caption_channels, inner)
        self.caption_projection.register_buffer("uncond_embedding", torch.zeros(caption_num_tokens, caption_channels))
        self.cond_pos_embed = patch_embed()
        self.controlnet_blocks = torch.nn.ModuleList([torch.nn.Linear(inner, inner) for _ in range(blocks)])
        for module in (self.cond_pos_embed, *self.controlnet_blocks):  # zero-initialised, as published
            for p in module.parameters():
                torch.nn.init.zeros_(p)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: torch.Tensor, conditioning_scale: float = 1.0,
                added_cond_kwargs: dict[str, Any] | None = None) -> list[torch.Tensor]:
        """Residuals for the base blocks.

        ``encoder_hidden_states`` are the UNI tokens ``(B, T, D)`` *without* positions (added here, as published).
        """
        batch = hidden_states.shape[0]
        hidden = self.pos_embed(hidden_states) + self.cond_pos_embed(conditioning)
        t_emb, _ = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=hidden.dtype)
        if self.y_pos_embed is not None:
            encoder_hidden_states = (encoder_hidden_states + self.y_pos_embed.y_pos_embed).to(encoder_hidden_states)
        tokens = self.caption_projection(encoder_hidden_states).view(batch, -1, hidden.shape[-1])
        residuals = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            hidden = block(hidden, encoder_hidden_states=tokens, timestep=t_emb)
            residuals.append(out(hidden) * conditioning_scale)
        return residuals


@contextlib.contextmanager
def block_residuals(transformer: PixArtTransformer2DModel, residuals: list[torch.Tensor]) -> Iterator[None]:
    """Add ``residuals[i]`` to the output of the stock transformer's block ``i`` (forward hooks, removed after)."""
    handles = [block.register_forward_hook(lambda _m, _a, out, r=r: out + r)
               for block, r in zip(transformer.transformer_blocks, residuals, strict=False)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PixCellControlNetPipeline(PixCellPipeline):
    """PixCell-256 whose nuclei follow a mask: ``pipe(instances, embeddings=uni)`` (the ``synth --masks`` contract).

    Components: those of :class:`~genpath.pipelines.pixcell.PixCellPipeline` plus ``controlnet``
    (:class:`PixCellControlNet`); config ``num_types`` = 0 (the published ControlNet reads the
    binary nuclei mask only; type maps are accepted and ignored).
    """

    model_cpu_offload_seq = "controlnet->transformer->vae"
    published_components = {"transformer": PIXCELL_TRANSFORMERS, "controlnet": ("PixCellControlNet",)}

    def __init__(self, vae: AutoencoderKL, transformer: PixArtTransformer2DModel, controlnet: PixCellControlNet,
                 scheduler: Any, uncond_embedding: torch.Tensor | None = None,
                 token_positions: torch.Tensor | None = None, num_types: int = 0) -> None:
        DiffusionPipeline.__init__(self)
        if num_types:
            raise ValueError(f"num_types: expected 0 (the binary nuclei mask is PixCell's condition), got {num_types}")
        self.register_modules(vae=vae, transformer=transformer, controlnet=controlnet, scheduler=scheduler)
        self.register_to_config(num_types=0)
        self.uncond_embedding = uncond_embedding
        self.token_positions = token_positions

    @classmethod
    def _load_parts(cls, folder: Path, dtype: torch.dtype, vae: Any, scheduler: Any) -> PixCellControlNetPipeline:
        transformer, uncond, positions = load_pixcell_transformer(folder / "transformer", dtype)
        config = read_json(folder / "controlnet" / "config.json")
        if config.get("_class_name") != "PixCellControlNet":
            raise ValueError(f"pretrained_model_name_or_path: expected a PixCellControlNet in {folder / 'controlnet'}, "
                             f"got {config.get('_class_name')!r}")
        controlnet = build_from_config(PixCellControlNet, config)
        load_strict(controlnet, read_weights(folder / "controlnet"), folder / "controlnet")
        return cls(vae=load_pixcell_vae(folder, vae, dtype), transformer=transformer,
                   controlnet=cast(controlnet, dtype),
                   scheduler=scheduler if scheduler is not None else load_scheduler(folder / "scheduler"),
                   uncond_embedding=uncond, token_positions=positions)

    def check_components(self) -> None:
        super().check_components()
        base, control = self.transformer.config, self.controlnet.config
        for key in ("num_attention_heads", "attention_head_dim", "in_channels", "patch_size", "caption_channels"):
            if base[key] != control[key]:
                raise ValueError(f"controlnet: expected {key} {base[key]} like the transformer, got {control[key]}")

    def check_inputs(self, instances: torch.Tensor, types: torch.Tensor | None, embeddings: torch.Tensor | None,
                     num_inference_steps: int, guidance_scale: float, scale: float, output_type: str = "pt",
                     generator: GeneratorLike = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate everything before any compute is spent; returns int64 ``(B,H,W)`` maps, ``(B,T,D)`` embeddings."""
        self.check_components()
        inst, _ = check_masks(instances, types, 0, "instances")
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if inst.shape[-2] % multiple or inst.shape[-1] % multiple:
            raise ValueError(f"instances: expected height and width divisible by the VAE factor x patch size "
                             f"{multiple}, got {inst.shape[-2]}x{inst.shape[-1]}")
        if embeddings is not None:
            embeddings = self.check_embeddings(embeddings)
        check_mask_sampling(embeddings, inst.shape[0], num_inference_steps, guidance_scale, scale, output_type,
                            generator)
        return inst, embeddings

    def mask_latents(self, instances: torch.Tensor) -> torch.Tensor:
        """Encode the ControlNet condition: VAE latents of the binary mask as a white-on-black RGB image."""
        rgb = (instances > 0).to(torch.float32)[:, None].expand(-1, 3, -1, -1)
        return encode_tiled(self.vae, rgb).to(self._execution_device, self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        instances: torch.Tensor,
        types: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 20,
        generator: GeneratorLike = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ) -> PixCellPipelineOutput | tuple:
        """Generate one tile per mask.

        Args:
            instances: integer instance maps ``(B,H,W)``/``(H,W)`` (nuclei > 0).
            types: ignored (accepted for the ``synth --masks`` contract).
            embeddings: UNI2-h tokens ``(B,T,D)`` setting style; None uses the stored unconditional
                embedding (no guidance).
            controlnet_conditioning_scale: weight of the mask residuals (0 ignores the mask).
            guidance_scale: classifier-free guidance on the embedding (only with embeddings).
            num_inference_steps: scheduler steps.
            generator: torch generator(s) for the initial noise (a list: one per mask).
            latents: initial noise ``(B,16,h,w)`` instead of sampling it.
            output_type: ``"pt"`` (float ``(B,3,H,W)`` in [0, 1]) or ``"latent"``.
            return_dict: return a :class:`~genpath.pipelines.pixcell.PixCellPipelineOutput` (else ``(images,)``).
        """
        # 1. checks
        inst, embeddings = self.check_inputs(instances, types, embeddings, num_inference_steps, guidance_scale,
                                             controlnet_conditioning_scale, output_type, generator)
        device, batch, f = self._execution_device, inst.shape[0], self.vae_scale_factor

        # 2. mask latents and tokens (the unconditional embedding when none are given)
        condition = self.mask_latents(inst)
        guided = embeddings is not None and guidance_scale != 1.0
        if embeddings is None:
            embeddings = self.uncond_embedding[None].expand(batch, -1, -1)
        tokens = self.encode_tokens(embeddings, guided)
        raw = embeddings.to(device, tokens.dtype)
        raw = torch.cat([self.uncond_embedding.to(raw).expand_as(raw), raw]) if guided else raw
        condition = torch.cat([condition] * 2) if guided else condition

        # 3. noise and timesteps
        shape = (batch, self.transformer.config.in_channels, inst.shape[-2] // f, inst.shape[-1] // f)
        latents = initial_latents(self.scheduler, num_inference_steps, shape, latents, generator, device,
                                  tokens.dtype)

        # 4. denoising: ControlNet residuals added to the transformer's blocks
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            timestep = t.reshape(-1)[:1].to(device).expand(model_in.shape[0])
            added = self.added_conditions(model_in.shape[0], *(s * f for s in latents.shape[-2:]))
            residuals = self.controlnet(model_in, condition, raw, timestep, controlnet_conditioning_scale, added)
            with block_residuals(self.transformer, residuals):
                noise = self.predict_noise(latents, t, tokens, guidance_scale)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]

        # 5. decode
        images = self.decode(latents, output_type)
        if not return_dict:
            return (images,)
        return PixCellPipelineOutput(images=images)
