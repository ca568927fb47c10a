"""``genpath synth-large``: one large image from a grid of embeddings (a real region's, or given).

1. Load the EmbeddingToImagePipeline (and, for ``from_region``, the encoder it was trained with).
2. Build the embedding grid: load ``(gh, gw, D)`` from ``.npy``, or embed the region's tiles.
3. Sample the canvas (:func:`genpath.pipelines.large_image.generate_large_image`, ``shifted`` or
   ``overlap`` windows) and write the PNG and a JSON report beside it, atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.io.images import read_image, write_image
from genpath.utils.atomic import atomic_write_json


def synth_large_image(
    model: str | Path,
    out: str | Path,
    from_region: str | Path | None = None,
    embeddings: str | Path | None = None,
    mode: str = "shifted",
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 25,
) -> dict[str, Any]:
    """Generate one large image into ``out`` (PNG) and ``out.with_suffix('.json')``; returns the report.

    Raises:
        ValueError: not exactly one of ``from_region`` / ``embeddings``, a region smaller than one
            tile, or ``out`` naming an input.
    """
    from genpath.pipelines import EmbeddingToImagePipeline
    from genpath.pipelines.large_image import generate_large_image, seam_score
    from genpath.synth import pipeline_encoder

    out = Path(out)
    if (from_region is None) == (embeddings is None):
        raise ValueError("from_region: expected exactly one of --from-region or --embeddings, got "
                         f"{'both' if from_region is not None else 'neither'}")
    for source in (from_region, embeddings):
        if source is not None and {out.resolve(), out.with_suffix(".json").resolve()} & {Path(source).resolve()}:
            raise ValueError(f"out: writing {out} (and its .json) would overwrite the input {source}")
    pipe = EmbeddingToImagePipeline.from_pretrained(model)
    tile = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if embeddings is not None:
        grid = torch.as_tensor(np.load(embeddings, allow_pickle=False), dtype=torch.float32)
    else:
        image = read_image(from_region)
        gh, gw = image.shape[1] // tile, image.shape[2] // tile
        if gh == 0 or gw == 0:
            raise ValueError(f"from_region: expected an image of at least {tile}px, got {tuple(image.shape[1:])}")
        tiles = image[:, : gh * tile, : gw * tile].unfold(1, tile, tile).unfold(2, tile, tile)
        tiles = tiles.permute(1, 2, 0, 3, 4).reshape(gh * gw, 3, tile, tile)
        with torch.no_grad():
            grid = pipeline_encoder(model)(tiles).reshape(gh, gw, -1)
    result = generate_large_image(pipe, grid, steps, guidance, torch.Generator().manual_seed(seed), mode=mode)
    write_image(result.images[0], out)
    report = {"size": list(result.images.shape[-2:]), "grid": list(grid.shape[:2]), "mode": mode,
              "cost_ratio": result.cost_ratio, "unet_calls": result.unet_calls,
              "seam_score": seam_score(result.images, tile), "seed": seed, "steps": steps, "guidance": guidance}
    atomic_write_json(out.with_suffix(".json"), report)
    return report
