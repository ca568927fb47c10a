"""Real tissue tiles cut from the project's own samples, shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from normalization.functional import rgb_to_od, tissue_mask_od

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["he_hgsc_nest.jpg", "he_hgsc_stroma.jpg", "he_tiatoolbox_target.png"]


def load_rgb(path: Path) -> torch.Tensor:
    """Read an image file as a uint8 ``(3,H,W)`` tensor."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()


def tissue_tiles(n: int = 64, size: int = 256, min_tissue: float = 0.5) -> torch.Tensor:
    """``n`` uint8 tiles ``(n,3,size,size)`` with at least ``min_tissue`` tissue, from samples/images."""
    tiles = []
    for name in SOURCES:
        image = load_rgb(ROOT / "samples" / "images" / name)
        _, h, w = image.shape
        for y in range(0, h - size + 1, size // 2):
            for x in range(0, w - size + 1, size // 2):
                tile = image[:, y : y + size, x : x + size]
                frac = tissue_mask_od(rgb_to_od(tile[None].float() / 255)).float().mean()
                if frac >= min_tissue:
                    tiles.append(tile)
    if len(tiles) < n:
        raise RuntimeError(f"only {len(tiles)} tissue tiles found in samples/images, need {n}")
    step = len(tiles) / n
    return torch.stack([tiles[int(i * step)] for i in range(n)]).contiguous()


def target_image() -> torch.Tensor:
    """The stain target shipped in samples (``he_tiatoolbox_target.png``)."""
    return load_rgb(ROOT / "samples" / "images" / "he_tiatoolbox_target.png")
