"""Tiled decoding for a diffusers ``VQModel`` (which has none), blended like genpath's other tiled decodes.

diffusers' ``AutoencoderKL`` decodes large latents in overlapping tiles (``enable_tiling``);
``VQModel`` does not (``enable_tiling`` raises ``NotImplementedError``). Quantisation and
``post_quant_conv`` act on each latent cell alone, so :func:`vq_decode_tiled` quantises the whole
latent once, runs the decoder on overlapping tiles (a quarter tile of overlap) and averages the
overlaps with linear ramps. A tile at least as large as the latent decodes in one piece, exactly
as ``vae.decode(z).sample``.

Example:
    >>> from diffusers import VQModel
    >>> vq = VQModel(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    ...              up_block_types=("UpDecoderBlock2D",) * 2, num_vq_embeddings=8)
    >>> vq_decode_tiled(vq, torch.randn(1, 3, 24, 24), tile=16).shape
    torch.Size([1, 3, 48, 48])
"""

from __future__ import annotations

from typing import Any

import torch


def _starts(n: int, size: int, stride: int) -> list[int]:
    """Tile origins covering ``n`` cells with tiles of ``size`` every ``stride`` (the last one flush with the end)."""
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


def _ramp(length: int, overlap: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Blending weights along one side: a linear ramp over ``overlap`` pixels at both ends, 1 inside."""
    i = torch.arange(length, device=device, dtype=dtype) + 0.5
    if overlap <= 0:
        return torch.ones(length, device=device, dtype=dtype)
    return torch.minimum(torch.ones_like(i), torch.minimum(i, length - i) / overlap)


def vq_decode_tiled(vae: Any, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Decode unscaled VQ latents ``z`` ``(B,C,h,w)`` like ``vae.decode(z).sample``, ``tile`` pixels at a time.

    Args:
        vae: a diffusers ``VQModel``.
        z: latents as ``VQModel.decode`` takes them (already divided by ``scaling_factor``).
        tile: tile side in pixels (a multiple of the VQ factor).

    Returns:
        The decoder output ``(B,3,h·f,w·f)`` (in [-1, 1] for a trained model).
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    if tile % f or tile < f:
        raise ValueError(f"tile: expected a positive multiple of the VQ factor {f}, got {tile}")
    t, (h, w) = tile // f, z.shape[-2:]
    if t >= max(h, w):
        return vae.decode(z).sample
    quant, _, _ = vae.quantize(z)
    quant2 = vae.post_quant_conv(quant)
    spatial = vae.config.norm_type == "spatial"
    (ty, oy), (tx, ox) = ((min(t, n), max(t // 4, 1) if t < n else 0) for n in (h, w))
    ramps = [_ramp(size * f, o * f, z.device, z.dtype) for size, o in ((ty, oy), (tx, ox))]
    wmap = (ramps[0][:, None] * ramps[1][None, :])[None, None]
    out, weight = None, z.new_zeros(1, 1, h * f, w * f)
    for y0 in _starts(h, ty, ty - oy):
        for x0 in _starts(w, tx, tx - ox):
            cell = (..., slice(y0, y0 + ty), slice(x0, x0 + tx))
            dec = vae.decoder(quant2[cell], quant[cell] if spatial else None)
            if out is None:
                out = dec.new_zeros(dec.shape[0], dec.shape[1], h * f, w * f)
            box = (..., slice(y0 * f, (y0 + ty) * f), slice(x0 * f, (x0 + tx) * f))
            out[box] += dec * wmap.to(dec.dtype)
            weight[box] += wmap
    return out / weight.to(out.dtype)
