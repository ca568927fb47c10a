"""Shared fixtures: Beer–Lambert images from known stain matrices, real sample tiles, shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genpath.data import shared_data_root
from genpath.io.images import read_image
from genpath.utils.quiet_imports import import_kornia
from normalization.functional import od_to_rgb, render_od

import_kornia()  # tests import kornia directly; its import-time TorchScript warnings are not under test

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"

#: A stain matrix unlike the reference one (columns: H, E), used to render known answers.
STAINS_A = F.normalize(torch.tensor([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]), dim=0)
STAINS_B = F.normalize(torch.tensor([[0.50, 0.25], [0.80, 0.85], [0.35, 0.45]]), dim=0)


def concentrations(b: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, non-negative H and E concentration fields ``(b,2,size,size)`` with some background."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((b, 2, 8, 8), generator=g)
    field = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    field = (field - 0.3).clamp(min=0) * torch.tensor([2.0, 1.2])[None, :, None, None]
    return field


def render(conc: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Beer–Lambert image ``(b,3,H,W)`` in [0, 1] from concentrations and one stain matrix."""
    return od_to_rgb(render_od(conc, stains.expand(conc.shape[0], 3, 2)))


@pytest.fixture
def rendered_a() -> torch.Tensor:
    return render(concentrations(4), STAINS_A)


@pytest.fixture(scope="session")
def real_tiles() -> torch.Tensor:
    """Eight real 128×128 uint8 tissue tiles cut from the shipped hgsc nest image (BSD-3)."""
    image = read_image(SAMPLES / "images" / "he_hgsc_nest.jpg")
    tiles = [image[:, y : y + 128, x : x + 128] for y in (256, 640) for x in (256, 512, 768, 1024)]
    return torch.stack(tiles).contiguous()


@pytest.fixture(scope="session")
def target_image() -> torch.Tensor:
    return read_image(SAMPLES / "images" / "he_tiatoolbox_target.png")[:, :512, :512].contiguous()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if root is None:
        pytest.skip("shared research data not present (set GENPATH_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def patches():
    """uint8 ``(8,192,192,3)`` real H&E patches (CRC-VAL-HE-7K, CC BY) to fill synthetic slides."""
    import numpy as np
    from PIL import Image

    files = sorted((SAMPLES / "tiles" / "crc").glob("*.png"))
    return np.stack([np.asarray(Image.open(p).convert("RGB"))[:192, :192] for p in files])
