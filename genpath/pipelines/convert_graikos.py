"""Graikos et al.'s latent diffusion models (CompVis ``.ckpt`` + project YAML) → an :class:`EmbeddingToImagePipeline`.

"Learned representation-guided diffusion models for large-image generation" (Graikos et al.,
CVPR 2024; ``cvlab-stonybrook/Large-Image-Diffusion``, a CompVis latent-diffusion fork) publishes
Lightning checkpoints (``checkpoints/last.ckpt``) and their project YAML
(``configs/*-project.yaml``; the shape of ``configs/latent-diffusion/*/*.yaml``):

* ``model.target: ldm.models.diffusion.ddpm.LatentDiffusion``, ``conditioning_key: crossattn``,
  the linear β schedule (``linear_start``/``linear_end``, ``timesteps``), ε prediction;
* ``model.diffusion_model.*``: ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` with
  ``use_spatial_transformer`` (published: ``model_channels`` 192, ``channel_mult`` [1,2,3,5],
  ``attention_resolutions`` [8,4,2], ``num_heads`` 1, ``context_dim`` 512, 3 latent channels);
* ``first_stage_model.*``: ``ldm.models.autoencoder.VQModelInterface`` (VQ-f4: ``ch`` 128,
  ``ch_mult`` [1,2,4], ``embed_dim`` 3, ``n_embed`` 8192, no attention but the middle one);
* ``cond_stage_model.*``: ``ldm.modules.encoders.modules.PatchEmbedder`` (``patch_fc``: one
  ``Linear`` D → 512 on the L2-normalised embedding, one token) or ``SSLEmbedder``
  (``patch_fc`` and ``region_fc``, two tokens).

The YAML is read with ``yaml.safe_load`` and its targets are compared as strings (nothing is
instantiated); the checkpoint is read weights-only (:mod:`genpath.pipelines.lightning_checkpoint`).
The result uses stock diffusers parts: the UNet as ``UNet2DConditionModel`` (keys converted by
diffusers' ``convert_ldm_unet_checkpoint``), the first stage as ``VQModel`` (diffusers'
``convert_ldm_vae_checkpoint`` plus the codebook; ``scaling_factor`` = the LDM's
``scale_factor``, 1.0; decoding quantises as ``decode_first_stage`` does), the conditioner as
:class:`~genpath.models.linear_projector.LinearEmbeddingProjector` (null tokens = the biases:
their unconditional input is a zero embedding), and ``PNDMScheduler(skip_prk_steps=True,
steps_offset=1, set_alpha_to_one=False)``, which steps as their ``PLMSSampler`` does.

Guidance: genpath's ``guidance_scale`` ``w`` gives ``ε_u + w (ε_c − ε_u)``, their samplers'
``unconditional_guidance_scale`` (``notebooks/brca_patch_synthesis.ipynb``: PLMS, 50 steps,
scale 2); their large-image loop (``notebooks/utils.py``) uses ``(1 + g) ε_c − g ε_u``, i.e.
``w = 1 + g`` (:func:`genpath_guidance`). Their UNet config's ``use_fp16`` only selects mixed
precision; genpath computes in float32.

Example:
    >>> genpath_guidance(3.0, "panorama")
    4.0
    >>> pipe, record = load_graikos_ldm("last.ckpt", "project.yaml")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genpath.pipelines.graikos_config import GraikosLDMConfig, read_graikos_config
from genpath.pipelines.lightning_checkpoint import read_lightning_state_dict
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
#: ``DDPM.register_schedule`` buffers (recomputed by the scheduler; ``betas`` is checked).
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor")
#: Other parts of a published checkpoint that sampling does not use.
IGNORED_PREFIXES = {"inception.": "the FID tracker (LatentDiffusion track_fid)"}
#: Their conditioner's weights → :class:`LinearEmbeddingProjector` weights, per token.
COND_LINEARS = ("patch_fc", "region_fc")


def genpath_guidance(published: float, convention: str = "sampler") -> float:
    """Return genpath's ``guidance_scale`` for a published guidance value.

    Args:
        published: their value.
        convention: ``"sampler"`` (``unconditional_guidance_scale`` of their PLMS/DDIM samplers:
            the same number) or ``"panorama"`` (``guidance`` of their large-image loop,
            ``(1+g) ε_c − g ε_u``: ``1 + g``).
    """
    if convention not in ("sampler", "panorama"):
        raise ValueError(f"convention: expected 'sampler' or 'panorama', got {convention!r}")
    return float(published) if convention == "sampler" else 1.0 + float(published)


@dataclass
class _Parts:
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    cond: dict[str, torch.Tensor]
    ignored: list[str]
    ema: bool


def _betas(cfg: GraikosLDMConfig) -> torch.Tensor:
    """Return their ``make_beta_schedule("linear")``: ``linspace(√start, √end, T, float64)²``."""
    return torch.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=torch.float64) ** 2


def split_state_dict(sd: dict[str, torch.Tensor], cfg: GraikosLDMConfig, argument: str = "src") -> _Parts:
    """Sort a LatentDiffusion state dict into UNet / first stage / conditioner weights (prefixes removed).

    With ``use_ema: true`` the UNet weights come from ``model_ema.*`` (their ``ema_scope()``).

    Raises:
        ValueError: keys no part claims, a missing part, EMA weights missing, or ``betas`` that
            are not the YAML's schedule.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {UNET_PREFIX: {}, FIRST_STAGE_PREFIX: {}, COND_PREFIX: {}}
    ignored, unknown, ema = [], [], {}
    for key, value in sd.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None:
            parts[prefix][key[len(prefix):]] = value
        elif key.startswith(EMA_PREFIX):
            ema[key[len(EMA_PREFIX):]] = value
        elif key in SCHEDULE_BUFFERS or key.startswith(tuple(IGNORED_PREFIXES)):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{argument}: expected only LatentDiffusion keys ({UNET_PREFIX}*, {FIRST_STAGE_PREFIX}*, "
                         f"{COND_PREFIX}*, {EMA_PREFIX}*, schedule buffers), got {len(unknown)} others: {unknown[:5]}")
    for prefix, what in ((UNET_PREFIX, "UNet"), (FIRST_STAGE_PREFIX, "first stage"), (COND_PREFIX, "conditioner")):
        if not parts[prefix]:
            raise ValueError(f"{argument}: expected the {what} weights ({prefix}*), got none (keys like "
                             f"{list(sd)[:3]})")
    if "betas" in sd:
        found = sd["betas"].detach().double().flatten()
        want = _betas(cfg)
        if found.shape != want.shape or not torch.allclose(found, want, rtol=1e-4, atol=1e-7):
            raise ValueError(f"{argument}: expected the betas of --config's schedule (linear {cfg.linear_start}.."
                             f"{cfg.linear_end}, {cfg.timesteps} steps), got {found.numel()} others "
                             f"(first {found[:2].tolist()}); the checkpoint does not match the config")
    unet = parts[UNET_PREFIX]
    if cfg.use_ema:  # LitEma: the parameter name without dots
        flat = {k: ema.get(("diffusion_model." + k).replace(".", "")) for k in unet}
        lacking = [k for k, v in flat.items() if v is None]
        if lacking:
            raise ValueError(f"{argument}: expected EMA weights {EMA_PREFIX}* for every UNet weight (--config says "
                             f"use_ema: true), got {len(lacking)} missing, e.g. {lacking[:3]}")
        unet = flat
    elif ema:
        ignored.append(f"{EMA_PREFIX}* ({len(ema)} tensors; use_ema: false)")
    return _Parts(unet, parts[FIRST_STAGE_PREFIX], parts[COND_PREFIX], ignored, cfg.use_ema)


def _dropped(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> list[str]:
    """Source keys the converter did not carry over (matched by storage)."""
    kept = {v.data_ptr() for v in converted.values() if isinstance(v, torch.Tensor)}
    return [k for k, v in source.items() if v.data_ptr() not in kept]


def _load_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str, prefix: str,
                 argument: str) -> None:
    """Load ``weights`` into ``model`` with no missing, unexpected, mis-shaped or non-finite tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
             if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing {missing[:3]}" if missing else "",
                 f"{len(unexpected)} unexpected {unexpected[:3]}" if unexpected else "",
                 f"{len(wrong)} of another shape {wrong[:2]}" if wrong else ""]
        raise ValueError(f"{argument}: expected {what} weights ({prefix}*) that fit --config, got "
                         f"{'; '.join(p for p in parts if p)} (diffusers names); the checkpoint does not match "
                         "the config")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{argument}: expected finite weights, got NaN or inf in {what} {bad[:3]}")
    model.load_state_dict({k: v.detach().to(torch.float32) for k, v in weights.items()}, strict=True)


def build_unet(weights: dict[str, torch.Tensor], cfg: GraikosLDMConfig, argument: str = "src") -> Any:
    """Build a ``UNet2DConditionModel`` from ``openaimodel.UNetModel`` weights (no ``model.diffusion_model.``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in weights.items()}, dict(cfg.unet))
    dropped = _dropped(weights, converted)
    if dropped:
        raise ValueError(f"{argument}: expected openaimodel.UNetModel weights that fit --config, got "
                         f"{len(dropped)} the conversion does not place, e.g. {[UNET_PREFIX + k for k in dropped[:3]]}")
    unet = UNet2DConditionModel(**cfg.unet)
    _load_strict(unet, converted, "UNet", UNET_PREFIX, argument)
    return unet.eval()


def build_vq(weights: dict[str, torch.Tensor], cfg: GraikosLDMConfig, argument: str = "src") -> Any:
    """Build a ``VQModel`` from ``VQModelInterface`` weights (keys without ``first_stage_model.``)."""
    from diffusers import VQModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint({FIRST_STAGE_PREFIX + k: v for k, v in weights.items()}, dict(cfg.vae))
    if "quantize.embedding.weight" in weights:  # the codebook: not in diffusers' AutoencoderKL mapping
        converted["quantize.embedding.weight"] = weights["quantize.embedding.weight"]
    dropped = _dropped(weights, converted)
    if dropped:
        raise ValueError(f"{argument}: expected VQModelInterface weights that fit --config, got {len(dropped)} the "
                         f"conversion does not place, e.g. {[FIRST_STAGE_PREFIX + k for k in dropped[:3]]}")
    vq = VQModel(**cfg.vae)
    _load_strict(vq, converted, "first stage", FIRST_STAGE_PREFIX, argument)
    return vq.eval()


def build_projector(weights: dict[str, torch.Tensor], cfg: GraikosLDMConfig, argument: str = "src") -> Any:
    """Build a :class:`LinearEmbeddingProjector` from ``PatchEmbedder``/``SSLEmbedder`` weights (``*_fc``)."""
    from genpath.models.linear_projector import LinearEmbeddingProjector

    names = COND_LINEARS[: len(cfg.embed_dims)]
    renamed = {}
    for key, value in weights.items():
        head, _, tail = key.partition(".")
        renamed[f"linears.{names.index(head)}.{tail}" if head in names else key] = value
    projector = LinearEmbeddingProjector(embed_dims=cfg.embed_dims, cross_attention_dim=cfg.cross_attention_dim,
                                         normalize=cfg.normalize)
    _load_strict(projector, renamed, f"{cfg.conditioner} (linears.N = {', '.join(names)})", COND_PREFIX, argument)
    return projector.eval()


def build_scheduler(cfg: GraikosLDMConfig) -> Any:
    """Build a ``PNDMScheduler`` stepping as their ``PLMSSampler`` (timesteps 1, 1+T/n, ...; α_0 last)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(num_train_timesteps=cfg.timesteps, beta_start=cfg.linear_start, beta_end=cfg.linear_end,
                         beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type="epsilon")


def convert_graikos_state_dict(sd: dict[str, torch.Tensor], cfg: GraikosLDMConfig, argument: str = "src"
                               ) -> tuple[Any, dict[str, Any]]:
    """Build the :class:`EmbeddingToImagePipeline` of a Graikos LDM state dict; return it and what was done.

    Raises:
        ValueError: the weights do not fit the config (one line naming what and where).
    """
    from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline

    if cfg.scale_by_std:  # the factor was measured at training: a checkpoint buffer
        value = sd.get("scale_factor")
        scale = float(value.double().item()) if isinstance(value, torch.Tensor) and value.numel() == 1 else math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{argument}: expected a positive scale_factor buffer (--config says scale_by_std: "
                             f"true), got {'none' if value is None else value.flatten()[:2].tolist()}")
        cfg = dataclasses.replace(cfg, scale_factor=scale, vae={**cfg.vae, "scaling_factor": scale})
    parts = split_state_dict(sd, cfg, argument)
    pipe = EmbeddingToImagePipeline(vae=build_vq(parts.vae, cfg, argument), unet=build_unet(parts.unet, cfg, argument),
                                    projector=build_projector(parts.cond, cfg, argument),
                                    scheduler=build_scheduler(cfg))
    pipe.check_components()
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(cfg.vae["block_out_channels"]) - 1)
    record = {"conditioner": cfg.conditioner, "embed_dims": list(cfg.embed_dims), "normalize_ssl": cfg.normalize,
              "tokens": len(cfg.embed_dims), "null_tokens": "the Linear biases (zero embeddings)",
              "ema": parts.ema, "ignored": parts.ignored, "tile_pixels": cfg.unet["sample_size"] * f,
              "scale_factor": cfg.scale_factor,
              "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.unet.items()},
              "first_stage": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.vae.items()},
              "scheduler": "PNDMScheduler (PLMS: skip_prk_steps, steps_offset 1, set_alpha_to_one false)",
              "guidance": "genpath guidance_scale = their unconditional_guidance_scale (sampler); = 1 + g for "
                          "their large-image loop's (1+g)·cond − g·uncond",
              "published_sampling": {"sampler": "PLMS", "steps": 50, "guidance_scale": 2.0}}
    return pipe, record


def load_graikos_ldm(src: str | Path, config: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read a Graikos et al. checkpoint and its project YAML into an :class:`EmbeddingToImagePipeline`.

    Args:
        src: the Lightning checkpoint (``last.ckpt``; a ``.safetensors`` of the same keys works too).
        config: their project YAML (``configs/*-project.yaml``).

    Returns:
        The pipeline (float32, eval) and a record of the conversion.

    Raises:
        FileNotFoundError: ``src`` or ``config`` is missing.
        ValueError: one line naming ``src`` or ``--config`` (see :func:`read_graikos_config`,
            :func:`~genpath.pipelines.lightning_checkpoint.read_lightning_state_dict`).
    """
    cfg = read_graikos_config(config)
    sd, stubbed = read_lightning_state_dict(src, "src", "Lightning checkpoint (.ckpt)")
    pipe, record = convert_graikos_state_dict(sd, cfg, "src")
    record["stand_ins"] = stubbed
    logger.info("converted %s (%s, %d UNet parameters)", src, cfg.conditioner,
                sum(p.numel() for p in pipe.unet.parameters()))
    return pipe, record


