"""Large images from a grid of embeddings: shifted-window latent diffusion and a tiled decode.

PixCell-style sliding windows (stride ½) cost about 3× the non-overlapping tiles, and
Graikos et al.'s about 10.6×. genpath denoises the whole latent canvas each step as a set of
*non-overlapping* windows whose grid is shifted by a different offset at every step (border
windows are cropped, never padded). A seam therefore sits at a different place at each step and
is denoised away by the next, and each step touches every latent pixel exactly once: the cost
is 1.0× the non-overlapping tiles in UNet pixels (a few more, smaller, UNet calls). The
``"overlap"`` mode (MultiDiffusion: overlapping windows, predictions averaged with feathered
weights each step) is there for comparison.

Each window is conditioned on the embedding of the grid cell under its centre, so a real
region's embedding grid (or an interpolated one) lays out the synthetic image.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from genpath.models.vae import decode_tiled
from genpath.pipelines.checks import check_conditioning, check_size
from genpath.pipelines.noise import initial_latents
from genpath.tiling import feather_weights


@dataclass
class LargeImagePipelineOutput(BaseOutput):
    """Output of :func:`generate_large_image`.

    Attributes:
        images: the image, float ``(1,3,H,W)`` in [0, 1].
        unet_pixels: latent pixels sent through the UNet (per guidance branch).
        tile_pixels: what non-overlapping tiles would cost.
        unet_calls: UNet forward passes (per guidance branch).
    """

    images: torch.Tensor
    unet_pixels: int
    tile_pixels: int
    unet_calls: int

    @property
    def cost_ratio(self) -> float:
        """UNet pixels over those of plain non-overlapping tiles (1.0 for ``"shifted"``)."""
        return self.unet_pixels / self.tile_pixels


Box = tuple[int, int, int, int]


def _windows(size_h: int, size_w: int, tile: int, stride: int, offset: tuple[int, int]) -> list[Box]:
    """Window boxes ``(y0, y1, x0, x1)`` covering the canvas, grid shifted by ``offset`` (crop at borders)."""

    def cuts(size: int, off: int) -> list[tuple[int, int]]:
        starts = list(range(off - tile if off else 0, size, stride))
        return [(max(s, 0), min(s + tile, size)) for s in starts if min(s + tile, size) > max(s, 0)]

    return [(y0, y1, x0, x1) for y0, y1 in cuts(size_h, offset[0]) for x0, x1 in cuts(size_w, offset[1])]


def _weights(h: int, w: int, overlap: int, device: torch.device) -> torch.Tensor:
    wy = torch.from_numpy(feather_weights(h, overlap // 2)) if overlap else torch.ones(h)
    wx = torch.from_numpy(feather_weights(w, overlap // 2)) if overlap else torch.ones(w)
    return (wy[:, None] * wx[None, :]).to(device)


def check_large_inputs(embedding_grid: torch.Tensor, mode: str, generator: object, overlap: object,
                        decode_tile: object, tile: int, factor: int) -> None:
    """Raise a one-line ``ValueError`` naming the first bad argument of :func:`generate_large_image`."""
    if not isinstance(embedding_grid, torch.Tensor) or embedding_grid.ndim != 3 or 0 in embedding_grid.shape:
        got = tuple(embedding_grid.shape) if isinstance(embedding_grid, torch.Tensor) else type(embedding_grid).__name__
        raise ValueError(f"embedding_grid: expected a non-empty (gh, gw, D) tensor, got {got}")
    check_conditioning(embedding_grid, "embedding_grid")
    if mode not in ("shifted", "overlap"):
        raise ValueError(f"mode: expected 'shifted' or 'overlap', got {mode!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected one torch.Generator (one canvas), got {type(generator).__name__}")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral)
                                or not 0 <= overlap < tile):
        raise ValueError(f"overlap: expected an integer in [0, {tile}) latent pixels (below the tile), got {overlap!r}")
    if decode_tile is not None:
        check_size(decode_tile, "decode_tile", factor)



def denoise_windows(
    scheduler,  # noqa: ANN001 - a diffusers scheduler, timesteps already set
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor, list[Box], int, int], torch.Tensor],
    tile: int,
    multiple: int,
    mode: str,
    overlap: int | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, int, int]:
    """Denoise the latent canvas ``(1,C,H,W)`` over ``scheduler.timesteps``, window by window.

    Each step the canvas is cut into ``tile``-sized windows: non-overlapping on a grid shifted by a
    fresh offset (a multiple of ``multiple``) for ``mode="shifted"``, or overlapping by ``overlap``
    (default a quarter tile, rounded down to ``multiple``) and feather-averaged for ``"overlap"``.
    Windows of one size are batched: ``predict(crops, t, boxes, h, w)`` returns the noise prediction
    of the crops ``(n,C,h,w)`` at boxes ``(y0, y1, x0, x1)``. The offsets are drawn from one integer
    taken from ``generator`` (seed 0 without one).

    Returns:
        ``(latents, pixels, calls)``: the denoised canvas, the latent pixels and the batches sent to ``predict``.
    """
    height, width = latents.shape[-2:]
    device = latents.device
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)) if generator else 0)
    if mode == "overlap":
        overlap = overlap if overlap is not None else tile // 4
        overlap -= overlap % multiple
        stride = tile - overlap
    else:
        overlap, stride = 0, tile
    pixels, calls = 0, 0
    for t in scheduler.timesteps:
        offset = tuple(int(v) * multiple for v in rng.integers(0, tile // multiple, size=2)) \
            if mode == "shifted" else (0, 0)
        noise = torch.zeros_like(latents)
        weight = torch.zeros((height, width), device=device, dtype=latents.dtype)
        groups: dict[tuple[int, int], list[Box]] = {}
        for box in _windows(height, width, tile, stride, offset):
            groups.setdefault((box[1] - box[0], box[3] - box[2]), []).append(box)
        for (h, w), boxes in groups.items():
            crops = torch.cat([latents[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
            pred = predict(crops, t, boxes, h, w)
            wmap = _weights(h, w, overlap, device)
            for (y0, y1, x0, x1), p in zip(boxes, pred, strict=True):
                noise[0, :, y0:y1, x0:x1] += p * wmap
                weight[y0:y1, x0:x1] += wmap
            pixels += len(boxes) * h * w
            calls += 1
        latents = scheduler.step(noise / weight, t, latents, return_dict=False)[0]
    return latents, pixels, calls


@torch.no_grad()
def generate_large_image(
    pipe,  # noqa: ANN001 - EmbeddingToImagePipeline
    embedding_grid: torch.Tensor,
    num_inference_steps: int = 25,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
    mode: str = "shifted",
    overlap: int | None = None,
    decode_tile: int | None = None,
    return_dict: bool = True,
) -> LargeImagePipelineOutput | tuple:
    """Generate one large image whose ``(gh, gw)`` tiles follow ``embedding_grid`` ``(gh, gw, D)``.

    Args:
        pipe: an :class:`~genpath.pipelines.EmbeddingToImagePipeline`.
        embedding_grid: one embedding per output tile (tile = the UNet's sample size).
        num_inference_steps: scheduler steps.
        guidance_scale: classifier-free guidance (1 = off).
        generator: seeds the canvas noise and the per-step window offsets (one generator; None:
            fresh noise, offsets from seed 0).
        mode: ``"shifted"`` (default, 1.0× cost) or ``"overlap"`` (MultiDiffusion averaging).
        overlap: latent pixels of overlap for ``"overlap"`` (default: a quarter tile).
        decode_tile: pixel tile of the blended tiled decode (default: 2 tiles).
        return_dict: return a :class:`LargeImagePipelineOutput` (else the tuple
            ``(images, unet_pixels, tile_pixels, unet_calls)``).

    Returns:
        A :class:`LargeImagePipelineOutput` with the image and its cost against plain tiles.
    """
    # 1. checks
    tile = pipe.unet.config.sample_size
    f = pipe.vae_scale_factor
    multiple = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    check_large_inputs(embedding_grid, mode, generator, overlap, decode_tile, tile, f)
    gh, gw, d = embedding_grid.shape
    pipe.check_inputs(embedding_grid.reshape(-1, d), tile * f, tile * f, num_inference_steps, guidance_scale, "pt")
    device = pipe._execution_device
    height, width = gh * tile, gw * tile

    # 2. tokens of every grid cell, canvas noise
    tokens = pipe.projector(embedding_grid.reshape(-1, d).to(device))  # (gh·gw, T, C)
    null = pipe.projector.null_tokens(1).to(tokens)
    do_cfg = guidance_scale != 1.0
    latents = initial_latents(pipe.scheduler, num_inference_steps, (1, pipe.unet.config.in_channels, height, width),
                              None, generator, device, tokens.dtype)

    def predict(crops: torch.Tensor, t: torch.Tensor, boxes: list[Box], h: int, w: int) -> torch.Tensor:
        if h % multiple or w % multiple:
            raise RuntimeError(f"window {h}x{w} not divisible by {multiple}")  # offsets are multiples
        cells = [min((y0 + y1) // 2 // tile, gh - 1) * gw + min((x0 + x1) // 2 // tile, gw - 1)
                 for y0, y1, x0, x1 in boxes]
        cond = tokens[cells]
        model_in = torch.cat([crops, crops]) if do_cfg else crops
        hidden = torch.cat([null.expand(len(boxes), -1, -1), cond]) if do_cfg else cond
        pred = pipe.unet(pipe.scheduler.scale_model_input(model_in, t), t, encoder_hidden_states=hidden).sample
        if do_cfg:
            uncond, condp = pred.chunk(2)
            pred = uncond + guidance_scale * (condp - uncond)
        return pred

    # 3. denoise the canvas window by window, the window grid moving every step
    latents, unet_pixels, calls = denoise_windows(pipe.scheduler, latents, predict, tile, multiple, mode, overlap,
                                                  generator)

    # 4. blended tiled decode
    images = decode_tiled(pipe.vae, latents, tile=decode_tile or 2 * tile * f)
    result = (images, unet_pixels, num_inference_steps * height * width, calls)
    if not return_dict:
        return result
    return LargeImagePipelineOutput(*result)


def seam_score(image: torch.Tensor, tile: int) -> float:
    """Gradient energy on tile borders divided by the interior's (≈1: no visible seams).

    Shape:
        image ``(3,H,W)`` or ``(1,3,H,W)`` float; ``tile`` in pixels.
    """
    x = image.reshape(-1, *image.shape[-2:]).float().mean(0)
    gy, gx = (x[1:] - x[:-1]).abs(), (x[:, 1:] - x[:, :-1]).abs()
    rows = torch.zeros(gy.shape[0], dtype=torch.bool)
    rows[tile - 1 :: tile] = True
    cols = torch.zeros(gx.shape[1], dtype=torch.bool)
    cols[tile - 1 :: tile] = True
    border = torch.cat([gy[rows].flatten(), gx[:, cols].flatten()])
    interior = torch.cat([gy[~rows].flatten(), gx[:, ~cols].flatten()])
    if border.numel() == 0:
        raise ValueError(f"tile: expected a tile smaller than the image, got {tile} for {tuple(x.shape)}")
    return float(border.mean() / interior.mean().clamp(min=1e-8))
