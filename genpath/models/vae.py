"""The histology VAE: a diffusers ``AutoencoderKL``, plus tiled encode/decode for large images.

genpath trains a small KL autoencoder on tiles (``genpath train vae``); users can point to any
diffusers VAE folder they hold (``AutoencoderKL.from_pretrained(path)``). Tiled coding uses
diffusers' own ``enable_tiling`` machinery (overlapping tiles, linear blending of overlaps).

Latents are scaled the way diffusers' SD3/Flux pipelines (and PixCell) scale them: both
``shift_factor`` and ``scaling_factor`` of the VAE config are honoured,
``latents = (z - shift_factor) * scaling_factor`` and ``z = latents / scaling_factor + shift_factor``
(``shift_factor`` None or absent counts as 0, so 4-channel SD-style VAEs are unchanged).

Example:
    >>> vae = build_vae(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
    ...                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, shift_factor=0.25,
    ...                 scaling_factor=2.0)
    >>> latent_scaling(vae)
    (2.0, 0.25)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL

from genpath.image_tensor import to_float_batch

#: A small architecture that trains on CPU: 3 stages (×4 downsampling), 4 latent channels.
SMALL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 96,
    "mid_block_add_attention": False,
}


def build_vae(**overrides: Any) -> AutoencoderKL:
    """Build a fresh ``AutoencoderKL`` with :data:`SMALL_VAE` settings, overridden by ``overrides``."""
    return AutoencoderKL(**{**SMALL_VAE, **overrides})


def load_vae(path: str) -> AutoencoderKL:
    """Load any diffusers ``AutoencoderKL`` folder in float32 (shipped checkpoints are stored as fp16)."""
    from pathlib import Path

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"vae: expected a diffusers AutoencoderKL folder with config.json, got {path}")
    return AutoencoderKL.from_pretrained(str(path), dtype=torch.float32, local_files_only=True, use_safetensors=True)


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_scaling(vae: AutoencoderKL) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE (a missing or None ``shift_factor`` is 0)."""
    shift = getattr(vae.config, "shift_factor", None)
    return float(vae.config.scaling_factor), float(shift) if shift is not None else 0.0


def _check_size(vae: AutoencoderKL, h: int, w: int, name: str) -> None:
    f = downsampling_factor(vae)
    if h % f or w % f:
        raise ValueError(f"{name}: expected height and width divisible by the VAE factor {f}, got {h}x{w}")


def _set_tiling(vae: AutoencoderKL, tile: int | None, pixels: int) -> None:
    """Turn diffusers' tiled coding on (tiles of ``tile`` pixels, 25% overlap) when the input is larger."""
    if tile and pixels > tile:
        f = downsampling_factor(vae)
        if tile % f:
            raise ValueError(f"tile: expected a multiple of the VAE factor {f}, got {tile}")
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // f
        vae.enable_tiling()
    else:
        vae.disable_tiling()


def encode_tiled(
    vae: AutoencoderKL, images: torch.Tensor, tile: int | None = None, sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Encode images to scaled latents (posterior mean unless ``sample``), tiled when larger than ``tile``.

    Shape:
        images ``(B,3,H,W)`` uint8 or float in [0, 1] → latents ``(B,C,H/f,W/f)``, ``(z - shift_factor) *
        scaling_factor``.
    """
    rgb, _ = to_float_batch(images, "images")
    _check_size(vae, rgb.shape[-2], rgb.shape[-1], "images")
    x = (rgb * 2 - 1).to(vae.device, vae.dtype)
    _set_tiling(vae, tile, max(x.shape[-2:]))
    dist = vae.encode(x).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    scale, shift = latent_scaling(vae)
    return (latents - shift) * scale


def decode_tiled(vae: AutoencoderKL, latents: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Decode scaled latents (``z = latents / scaling_factor + shift_factor``) to float images in [0, 1].

    Tiled (blended) when larger than ``tile`` pixels.
    """
    scale, shift = latent_scaling(vae)
    z = latents.to(vae.device, vae.dtype) / scale + shift
    if not hasattr(vae, "tiled_decode"):  # diffusers' VQModel (Graikos et al.) has no tiling of its own
        from genpath.models.vq import vq_decode_tiled

        out = vq_decode_tiled(vae, z, tile) if tile else vae.decode(z).sample
    else:
        _set_tiling(vae, tile, max(latents.shape[-2:]) * downsampling_factor(vae))
        out = vae.decode(z).sample
    return ((out.float() + 1) / 2).clamp(0, 1)
