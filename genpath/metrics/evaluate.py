"""``genpath eval synth``: compare a folder (or zarr) of generated tiles with real tiles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def load_tiles(source: str | Path, limit: int | None = None, argument: str = "source") -> torch.Tensor:
    """uint8 ``(N,3,H,W)`` tiles from an image folder or a synth ``images.zarr`` (all the same size)."""
    source = Path(source)
    if source.name.endswith(".zarr") or (source / "images.zarr").exists():
        import zarr

        group = zarr.open_group(str(source if source.name.endswith(".zarr") else source / "images.zarr"), mode="r")
        array = group["images"]
        return torch.from_numpy(array[: limit or array.shape[0]])
    from genpath.io.images import expand_inputs, read_image

    try:
        files = expand_inputs([source])[: limit or None]
    except FileNotFoundError as error:
        raise FileNotFoundError(str(error).replace("inputs:", f"{argument}:", 1)) from None
    tiles = [read_image(p) for p, _ in files]
    sizes = {tuple(t.shape) for t in tiles}
    if len(sizes) != 1:
        raise ValueError(f"{argument}: expected tiles of one size in {source}, got {sorted(sizes)}")
    return torch.stack(tiles)


def evaluate_synthetic(
    real: str | Path, fake: str | Path, encoders: Sequence[str] = ("inception.fid",),
    encoder_kwargs: dict[str, dict[str, Any]] | None = None, limit: int | None = None, kid_subset: int = 100,
) -> dict[str, Any]:
    """Fréchet distance and KID of ``fake`` against ``real`` in each encoder's space.

    ``inception.fid`` gives the usual FID/KID; any registered encoder gives an FD/KID in its space.
    """
    from genpath.encoders import create_encoder
    from genpath.metrics.distribution import embed_images, frechet_distance, kernel_inception_distance

    real_tiles, fake_tiles = load_tiles(real, limit, "real"), load_tiles(fake, limit, "fake")
    report: dict[str, Any] = {"real": str(real), "fake": str(fake), "n_real": len(real_tiles),
                              "n_fake": len(fake_tiles), "metrics": {}}
    for name in encoders:
        encoder = create_encoder(name, **(encoder_kwargs or {}).get(name, {}))
        a, b = embed_images(encoder, real_tiles), embed_images(encoder, fake_tiles)
        kid, kid_std = kernel_inception_distance(a, b, subsets=50, subset_size=min(kid_subset, len(a), len(b)))
        report["metrics"][name] = {"fd": frechet_distance(a, b), "kid": kid, "kid_std": kid_std}
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path
