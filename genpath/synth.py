"""Synthetic dataset generation with an :class:`~genpath.pipelines.EmbeddingToImagePipeline`.

1. Conditions: embeddings from a ``.npy`` file ``(N,D)``, or real images embedded with the
   pipeline's encoder (``encoder.json`` in the pipeline folder): *variations of real images*.
2. Samples: ``n_per_condition`` per condition; sample ``(i, k)`` always uses seed
   ``seed + i·n + k`` with its own generator, so results do not depend on batching or resuming.
3. Output: ``OUT/images.zarr`` (arrays ``images`` ``(N,3,H,W)`` uint8 chunked per image,
   ``condition``, ``seed``; group ``conditions`` with the embeddings) or ``OUT/images/*.png``;
   always ``OUT/embeddings.npy`` and ``OUT/manifest.csv`` (one row per sample: id, condition,
   source, seed, model, guidance, steps, file). The manifest is rewritten atomically after each
   batch; a rerun skips the samples it lists, so an interrupted run neither loses nor duplicates.

The pipeline loads with ``EmbeddingToImagePipeline.from_pretrained`` (genpath's one loading path).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genpath.encoders.base import ImageEncoder
from genpath.encoders.reference import load_encoder_reference
from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline
from genpath.pipelines.loading import check_pretrained_folder
from genpath.utils.atomic import atomic_path, atomic_write_csv
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
MANIFEST_FIELDS = ("id", "condition", "source", "seed", "model", "guidance", "steps", "file")


@dataclass
class SynthConfig:
    """Settings of ``genpath synth`` (see module doc)."""

    model: str
    out: str
    from_images: list[str] = field(default_factory=list)
    embeddings: str | None = None
    n_per_condition: int = 4
    output_format: str = "zarr"
    seed: int = 0
    guidance: float = 2.0
    steps: int = 25
    batch_size: int = 8
    size: int | None = None

    def __post_init__(self) -> None:
        if bool(self.from_images) == bool(self.embeddings):
            raise ValueError("from_images/embeddings: expected exactly one condition source, got "
                             f"{'both' if self.from_images else 'neither'}")
        if self.output_format not in ("zarr", "png"):
            raise ValueError(f"output_format: expected 'zarr' or 'png', got {self.output_format!r}")
        for name in ("n_per_condition", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")


def pipeline_encoder(model: str | Path) -> ImageEncoder:
    """Create the encoder recorded in the pipeline's ``encoder.json`` (with a hint when there is none)."""
    try:
        return load_encoder_reference(model)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --embeddings FILE.npy instead") from error


def _conditions(cfg: SynthConfig, pipe: EmbeddingToImagePipeline) -> tuple[torch.Tensor, list[str]]:
    if cfg.embeddings:
        array = np.load(cfg.embeddings)
        embeddings = torch.as_tensor(array, dtype=torch.float32)
        pipe.projector.check_embeddings(embeddings, "embeddings")
        return embeddings, [f"{Path(cfg.embeddings).name}[{i}]" for i in range(len(array))]
    from genpath.io.images import expand_inputs, read_image

    encoder = pipeline_encoder(cfg.model)
    files = expand_inputs(cfg.from_images)
    with torch.no_grad():
        embeddings = torch.cat([encoder(read_image(p)[None]) for p, _ in files])
    return embeddings, [str(p) for p, _ in files]


def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV (none when the file does not exist yet)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_synth(cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate (or finish generating) a synthetic dataset; returns the manifest rows."""
    folder = check_pretrained_folder(cfg.model, "model", "EmbeddingToImagePipeline folder")
    pipe = EmbeddingToImagePipeline.from_pretrained(folder)
    embeddings, sources = _conditions(cfg, pipe)
    f = pipe.vae_scale_factor
    size = cfg.size or pipe.unet.config.sample_size * f
    pipe.check_inputs(embeddings, size, size, cfg.steps, cfg.guidance, "pt")  # fail before any compute
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "embeddings.npy") as tmp:
        np.save(tmp, embeddings.numpy())
    n_total = len(sources) * cfg.n_per_condition
    manifest = out / "manifest.csv"
    rows = read_manifest(manifest)
    done = {int(r["id"]) for r in rows}
    images_array = None
    if cfg.output_format == "zarr":
        import zarr

        group = zarr.open_group(str(out / "images.zarr"), mode="a")
        if "images" not in group or group["images"].shape != (n_total, 3, size, size):
            images_array = group.create_array("images", shape=(n_total, 3, size, size), chunks=(1, 3, size, size),
                                              dtype="uint8", overwrite=True)
            group.create_array("condition", data=np.repeat(np.arange(len(sources)), cfg.n_per_condition),
                               overwrite=True)
            group.create_array("seed", data=cfg.seed + np.arange(n_total), overwrite=True)
            group.create_array("embeddings", data=embeddings.numpy(), overwrite=True)
            done, rows = set(), []
        images_array = group["images"]
    todo = [i for i in range(n_total) if i not in done]
    if done:
        logger.info("resuming %s: %d of %d samples done, %d to go", out, n_total - len(todo), n_total, len(todo))
    for start in range(0, len(todo), cfg.batch_size):
        ids = todo[start : start + cfg.batch_size]
        conds = [i // cfg.n_per_condition for i in ids]
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in ids]
        with torch.no_grad():
            images = pipe(embeddings[conds], height=size, width=size, num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance, generator=generators).images
        uint8 = (images * 255).round().to(torch.uint8).cpu()
        for sample_id, cond, image in zip(ids, conds, uint8, strict=True):
            if images_array is not None:
                images_array[sample_id] = image.numpy()
                file = f"images.zarr/images[{sample_id}]"
            else:
                from genpath.io.images import write_image

                file = f"images/cond{cond:05d}_{sample_id % cfg.n_per_condition:03d}.png"
                write_image(image, out / file)
            rows.append({"id": sample_id, "condition": cond, "source": sources[cond], "seed": cfg.seed + sample_id,
                         "model": str(cfg.model), "guidance": cfg.guidance, "steps": cfg.steps, "file": file})
        rows.sort(key=lambda r: int(r["id"]))
        atomic_write_csv(manifest, rows, MANIFEST_FIELDS)
        if progress:
            progress(len(rows), n_total)
    return rows
