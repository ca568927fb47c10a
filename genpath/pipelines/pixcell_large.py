"""Large images with PixCell: :func:`genpath.pipelines.large_image.generate_large_image`'s windows on a transformer.

The canvas is laid out by a grid ``(gh, gw, D)`` of UNI2-h embeddings, one per ``cell_size`` pixels
(256 px for both published models). Every step denoises the canvas as windows of the
transformer's training size (256 px for PixCell-256, 1024 px for PixCell-1024), on a grid shifted
by a different offset each step (``"shifted"``, 1.0x the cost of plain tiles) or overlapping and
feather-averaged (``"overlap"``), exactly as for the UNet pipelines. A window's UNI tokens are the
grid cells under the centres of its ``sqrt(T) x sqrt(T)`` sub-squares (row-major): the one cell
under its centre for PixCell-256, the 4x4 cells it covers for PixCell-1024.
"""

from __future__ import annotations

import math

import torch

from genpath.models.vae import decode_tiled
from genpath.pipelines.large_image import Box, LargeImagePipelineOutput, check_large_inputs, denoise_windows
from genpath.pipelines.noise import initial_latents
from genpath.pipelines.pixcell import PixCellPipeline


def window_cells(box: tuple[int, int, int, int], side: int, cell: int, grid: tuple[int, int]) -> list[int]:
    """Row-major grid indices of the cells under the centres of a window's ``side x side`` sub-squares.

    Example:
        >>> window_cells((0, 8, 0, 8), 2, 4, (3, 3))  # an aligned 8x8 window over 4-px cells: cells 0, 1, 3, 4
        [0, 1, 3, 4]
    """
    y0, y1, x0, x1 = box
    rows = [min(int((y0 + (i + 0.5) * (y1 - y0) / side) // cell), grid[0] - 1) for i in range(side)]
    cols = [min(int((x0 + (j + 0.5) * (x1 - x0) / side) // cell), grid[1] - 1) for j in range(side)]
    return [r * grid[1] + c for r in rows for c in cols]


@torch.no_grad()
def generate_large_pixcell(
    pipe: PixCellPipeline,
    embedding_grid: torch.Tensor,
    num_inference_steps: int = 20,
    guidance_scale: float = 2.0,
    generator: torch.Generator | None = None,
    mode: str = "shifted",
    overlap: int | None = None,
    decode_tile: int | None = None,
    return_dict: bool = True,
) -> LargeImagePipelineOutput | tuple:
    """Generate one large image whose ``cell_size``-pixel cells follow ``embedding_grid`` ``(gh, gw, D)``.

    Args:
        pipe: a :class:`~genpath.pipelines.pixcell.PixCellPipeline`.
        embedding_grid: one UNI2-h embedding per ``pipe.cell_size`` pixels.
        num_inference_steps: scheduler steps.
        guidance_scale: guidance against the stored unconditional embedding (1 = off).
        generator: seeds the canvas noise and the per-step window offsets (None: fresh noise, offsets from seed 0).
        mode: ``"shifted"`` (default, 1.0x cost) or ``"overlap"`` (MultiDiffusion averaging).
        overlap: latent pixels of overlap for ``"overlap"`` (default: a quarter window).
        decode_tile: pixel tile of the blended tiled decode (default: 2 windows).
        return_dict: return a :class:`~genpath.pipelines.large_image.LargeImagePipelineOutput` (else its tuple).
    """
    # 1. checks
    tile, f = pipe.transformer.config.sample_size, pipe.vae_scale_factor
    multiple, side = pipe.transformer.config.patch_size, math.isqrt(pipe.num_tokens)
    cell = tile // side
    check_large_inputs(embedding_grid, mode, generator, overlap, decode_tile, tile, f)
    gh, gw, d = embedding_grid.shape
    pipe.check_inputs(embedding_grid.reshape(-1, 1, d).expand(-1, pipe.num_tokens, -1), tile * f, tile * f,
                      num_inference_steps, guidance_scale, "pt")
    device, guided = pipe._execution_device, guidance_scale != 1.0
    height, width = gh * cell, gw * cell

    # 2. canvas noise
    cells = embedding_grid.reshape(-1, d)
    latents = initial_latents(pipe.scheduler, num_inference_steps,
                              (1, pipe.transformer.config.in_channels, height, width), None, generator, device,
                              pipe.transformer.dtype)

    def predict(crops: torch.Tensor, t: torch.Tensor, boxes: list[Box], h: int, w: int) -> torch.Tensor:
        tokens = torch.stack([cells[window_cells(box, side, cell, (gh, gw))] for box in boxes])
        return pipe.predict_noise(crops, t, pipe.encode_tokens(tokens, guided), guidance_scale)

    # 3. denoise the canvas window by window, the window grid moving every step
    latents, pixels, calls = denoise_windows(pipe.scheduler, latents, predict, tile, multiple, mode, overlap, generator)

    # 4. blended tiled decode
    images = decode_tiled(pipe.vae, latents, tile=decode_tile or 2 * tile * f)
    result = (images, pixels, num_inference_steps * height * width, calls)
    if not return_dict:
        return result
    return LargeImagePipelineOutput(*result)
