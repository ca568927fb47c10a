"""``genpath synth-large``: one large image from a grid of embeddings (a real region's, or given).

1. Load the EmbeddingToImagePipeline, or a published PixCell folder with the SD3.5 ``vae``
   (:func:`genpath.synth.load_synth_pipeline`), and, for ``from_region``, the encoder (``encoder``
   ``NAME[:WEIGHTS]``, e.g. ``uni2-h:PATH`` for PixCell, else the folder's ``encoder.json``).
2. Build the embedding grid: load ``(gh, gw, D)`` from ``.npy``, or embed the region's tiles
   (one per tile of the UNet's size; for PixCell one per 256-px cell, its UNI2-h token size).
3. Sample the canvas (:func:`genpath.pipelines.large_image.generate_large_image`, or
   :func:`genpath.pipelines.pixcell_large.generate_large_pixcell`; ``shifted`` or ``overlap``
   windows) and write the PNG and a JSON report beside it, atomically.

``out`` is never a file genpath did not write: an existing ``out`` or ``out.json`` is replaced
only when that JSON records ``"created_by": "genpath synth-large"`` (a previous result; the
marker is written just before the image), and never when it is one of the inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.io.images import IMAGE_SUFFIXES, read_image, write_image
from genpath.utils.atomic import atomic_write_json

MARKER = "genpath synth-large"


def check_large_output(out: Path, inputs: tuple[str | Path | None, ...] = ()) -> None:
    """Refuse an ``out`` (or its ``.json``) that is an input or an existing file synth-large did not write.

    Raises:
        ValueError: one line naming ``out``.
    """
    report = out.with_suffix(".json")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out: expected an image file name ({', '.join(sorted(IMAGE_SUFFIXES))}), got {out}")
    for source in inputs:
        if source is not None and {out.resolve(), report.resolve()} & {Path(source).resolve()}:
            raise ValueError(f"out: writing {out} (and its .json) would overwrite the input {source}")
    for path in (out, report):
        if path.exists() and not path.is_file():
            raise ValueError(f"out: expected a file name for {path}, got an existing folder")
    if not (out.exists() or report.exists()):
        return
    created_by = None
    if report.is_file():
        try:
            created_by = json.loads(report.read_text(encoding="utf-8")).get("created_by")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            created_by = None
    if created_by != MARKER:
        raise ValueError(f"out: expected a new file or a previous synth-large result ({report} recording "
                         f"\"created_by\": \"{MARKER}\"), got existing files genpath did not write")


def synth_large_image(
    model: str | Path,
    out: str | Path,
    from_region: str | Path | None = None,
    embeddings: str | Path | None = None,
    mode: str = "shifted",
    seed: int = 0,
    guidance: float = 2.0,
    steps: int = 25,
    trust_model_code: bool = False,
    vae: str | Path | None = None,
    encoder: str | None = None,
) -> dict[str, Any]:
    """Generate one large image into ``out`` (PNG) and ``out.with_suffix('.json')``; returns the report.

    Raises:
        ValueError: not exactly one of ``from_region`` / ``embeddings``, a region smaller than one
            tile, or ``out`` (or its ``.json``) naming an input or an existing file that is not a
            previous synth-large result.
    """
    from genpath.pipelines.large_image import generate_large_image, seam_score
    from genpath.synth import load_synth_pipeline, pipeline_encoder

    out = Path(out)
    if (from_region is None) == (embeddings is None):
        raise ValueError("from_region: expected exactly one of --from-region or --embeddings, got "
                         f"{'both' if from_region is not None else 'neither'}")
    check_large_output(out, (from_region, embeddings))
    pipe = load_synth_pipeline(model, None if vae is None else str(vae))
    pixcell = hasattr(pipe, "transformer")
    tile = pipe.cell_size if pixcell else pipe.unet.config.sample_size * pipe.vae_scale_factor
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
            grid = pipeline_encoder(model, allow_code=trust_model_code, encoder=encoder)(tiles).reshape(gh, gw, -1)
    if pixcell:
        from genpath.pipelines.pixcell_large import generate_large_pixcell as generate
    else:
        generate = generate_large_image
    result = generate(pipe, grid, steps, guidance, torch.Generator().manual_seed(seed), mode=mode)
    # the marker first: a run killed while writing the image leaves a result the next run may replace
    atomic_write_json(out.with_suffix(".json"), {"created_by": MARKER, "status": "writing", "seed": seed,
                                                 "steps": steps, "guidance": guidance, "mode": mode})
    write_image(result.images[0], out)
    report = {"size": list(result.images.shape[-2:]), "grid": list(grid.shape[:2]), "mode": mode,
              "cost_ratio": result.cost_ratio, "unet_calls": result.unet_calls,
              "seam_score": seam_score(result.images, tile), "seed": seed, "steps": steps, "guidance": guidance}
    atomic_write_json(out.with_suffix(".json"), {"created_by": MARKER, **report})
    return report
