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
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

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


def load_pipeline(model: str | Path):  # noqa: ANN201 - EmbeddingToImagePipeline
    """Load a saved pipeline folder with a clear error when it is not one."""
    from genpath.pipelines import EmbeddingToImagePipeline

    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"model: expected an EmbeddingToImagePipeline folder (model_index.json), got {folder}")
    pipe = EmbeddingToImagePipeline.from_pretrained(str(folder), torch_dtype=torch.float32)  # shipped as fp16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_encoder(model: str | Path):  # noqa: ANN201 - ImageEncoder
    """Create the encoder recorded in the pipeline's ``encoder.json``."""
    from genpath.encoders.reference import load_encoder_reference

    try:
        return load_encoder_reference(model)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --embeddings FILE.npy instead") from error


def _conditions(cfg: SynthConfig, pipe) -> tuple[torch.Tensor, list[str]]:  # noqa: ANN001
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


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(path: Path, rows: list[dict], fields: tuple[str, ...] = MANIFEST_FIELDS) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def run_synth(cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate (or finish generating) a synthetic dataset; returns the manifest rows."""
    pipe = load_pipeline(cfg.model)
    embeddings, sources = _conditions(cfg, pipe)
    f = pipe.vae_scale_factor
    size = cfg.size or pipe.unet.config.sample_size * f
    pipe.check_inputs(embeddings, size, size, cfg.steps, cfg.guidance, "pt")  # fail before any compute
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", embeddings.numpy())
    n_total = len(sources) * cfg.n_per_condition
    manifest = out / "manifest.csv"
    rows = _read_manifest(manifest)
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
        _write_manifest(manifest, rows)
        if progress:
            progress(len(rows), n_total)
    return rows
