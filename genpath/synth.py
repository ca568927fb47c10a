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
4. Settings: ``OUT/run.json`` records what decides the samples (model folder and a fingerprint of
   its config files, a fingerprint of the conditions, n, seed, steps, guidance, size, format)
   before anything else is written. A rerun with the same settings resumes; one with other
   settings is refused (:func:`genpath.synth_shards.prepare_run_folder`) unless ``overwrite``,
   which first deletes only what a synth run writes. No input may lie among the outputs.
5. Bad input: a reference image that cannot be read or embedded is a *failed* row of the
   manifest (columns ``status`` ``failed`` and ``error``, no id) and the other images are used
   (conditions are numbered over the readable ones; the CLI exits with code 1). Everything else
   is refused in one line naming the argument before any output is written: a broken or
   non-numeric ``embeddings`` file (read with ``allow_pickle=False``), NaN/inf or out-of-range
   ``guidance``, more than :data:`MAX_SAMPLES` samples in all (conditions × ``n_per_condition``)
   or a ``batch_size`` above :data:`MAX_BATCH_SIZE`. Sample ids are generated lazily, one batch
   at a time.
6. Scale (:mod:`genpath.synth_shards`): ``shard="I/N"`` generates only part ``I`` (0-based) of
   ``N``, in whole batches, with the same per-sample seeds; ``genpath synth-merge`` merges the
   shard folders into what an unsharded run writes. ``executor="dask"`` runs ``workers`` shards
   on a dask cluster and merges them.

The pipeline loads with ``EmbeddingToImagePipeline.from_pretrained`` (genpath's one loading path),
or, for a published PixCell folder (``model_index.json`` naming ``PixCellPipeline``), with
:class:`~genpath.pipelines.pixcell.PixCellPipeline` and the SD3.5 VAE given as ``vae``
(:func:`load_synth_pipeline`). Reference images are embedded with ``encoder`` (a registered
encoder, ``NAME[:WEIGHTS]``, e.g. ``uni2-h:models/uni2-h/pytorch_model.bin``) or, without it, the
encoder the folder's ``encoder.json`` records; PixCell-1024 embeds the 4x4 row-major grid of
256-px crops of each 1024-px reference, and takes ``(N, 16, D)`` arrays from ``embeddings``.
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from genpath.encoders.base import ImageEncoder
from genpath.encoders.reference import load_encoder_reference
from genpath.pipelines.checks import MAX_GUIDANCE, check_number
from genpath.pipelines.embedding_to_image import EmbeddingToImagePipeline
from genpath.pipelines.loading import check_pretrained_folder, pipeline_class_name
from genpath.synth_shards import (
    LOAD_LOCK,
    RUN_FILE,
    check_executor,
    check_inputs_outside,
    done_rows,
    prepare_run_folder,
    read_manifest,
    recorded_settings,
    run_sharded,
    shard_settings,
)
from genpath.utils.atomic import atomic_path, atomic_write_csv
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
MANIFEST_FIELDS = ("id", "condition", "source", "seed", "model", "guidance", "steps", "file", "status", "error")
#: most samples one run may make (conditions × samples per condition)
MAX_SAMPLES = 10_000_000
#: most samples per pipeline call
MAX_BATCH_SIZE = 1024
#: seeds ``seed + i`` must fit a signed 64-bit integer for every sample id ``i``
SEED_RANGE = (-(2**63), 2**63 - 1 - MAX_SAMPLES)


def check_count(value: object, name: str, high: int) -> int:
    """Return ``value`` when it is an integer in ``[1, high]``; else a one-line ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= high:
        raise ValueError(f"{name}: expected an integer in [1, {high}], got {value!r}")
    return int(value)


def check_seed(value: object) -> int:
    """Return ``value`` when ``seed + i`` fits 64 bits for every sample; else a one-line ``ValueError``."""
    low, high = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"seed: expected an integer in [{low}, {high}], got {value!r}")
    return int(value)


def check_total(n_conditions: int, n_per: int, name: str = "n_per_condition", what: str = "conditions") -> int:
    """Return ``n_conditions * n_per`` when it is at most :data:`MAX_SAMPLES`; else a ``ValueError`` naming ``name``."""
    total = n_conditions * n_per
    if not total <= MAX_SAMPLES:
        raise ValueError(f"{name}: expected at most {MAX_SAMPLES} samples in all, got {n_conditions} {what} "
                         f"x {n_per} = {total}")
    return total


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
    overwrite: bool = False
    trust_model_code: bool = False
    shard: str | None = None
    executor: str = "local"
    workers: int = 1
    scheduler: str | None = None
    vae: str | None = None
    encoder: str | None = None

    def __post_init__(self) -> None:
        if bool(self.from_images) == bool(self.embeddings):
            raise ValueError("from_images/embeddings: expected exactly one condition source, got "
                             f"{'both' if self.from_images else 'neither'}")
        if self.output_format not in ("zarr", "png"):
            raise ValueError(f"output_format: expected 'zarr' or 'png', got {self.output_format!r}")
        check_count(self.n_per_condition, "n_per_condition", MAX_SAMPLES)
        check_count(self.batch_size, "batch_size", MAX_BATCH_SIZE)
        check_count(self.steps, "steps", 10_000)
        check_seed(self.seed)
        check_number(self.guidance, "guidance", 0.0, MAX_GUIDANCE, "1 = no guidance")
        check_executor(self.executor, self.workers, self.shard, self.scheduler)


def pipeline_encoder(model: str | Path, allow_code: bool = False, encoder: str | None = None) -> ImageEncoder:
    """Create ``encoder`` (a registered ``NAME[:WEIGHTS]``), else the one the pipeline's ``encoder.json`` records.

    ``allow_code`` lets a TorchScript encoder named by the folder run (``--trust-model-code``).
    """
    if encoder is not None:
        from genpath.apps.embed_dataset import build_encoder

        return build_encoder(encoder)[2].eval()
    try:
        return load_encoder_reference(model, allow_code=allow_code)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --encoder NAME:WEIGHTS (uni2-h:PATH for PixCell) or "
                                "--embeddings FILE.npy instead") from error


def load_synth_pipeline(model: str | Path, vae: str | None = None) -> Any:
    """Load the pipeline of ``model``: a PixCell folder (with the SD3.5 ``vae``) or an EmbeddingToImagePipeline.

    Raises:
        FileNotFoundError / ValueError: one line naming ``model`` or ``vae`` (a PixCell folder without
            ``vae``, a ``vae`` for a genpath pipeline, a ControlNet folder without ``--masks``).
    """
    folder = check_pretrained_folder(model, "model", "EmbeddingToImagePipeline or PixCell folder")
    name = pipeline_class_name(folder)
    if name == "PixCellControlNetPipeline":
        raise ValueError(f"model: expected a PixCell or EmbeddingToImagePipeline folder, got the PixCell ControlNet "
                         f"{folder} (use it with --masks)")
    with LOAD_LOCK:
        if name == "PixCellPipeline":
            from genpath.pipelines.pixcell import PixCellPipeline

            return PixCellPipeline.from_pretrained(folder, vae=vae)
        if vae is not None:
            raise ValueError(f"vae: expected only with a PixCell folder (the SD3.5 VAE it lacks), got {vae} for "
                             f"{name or 'a pipeline'} in {folder}")
        return EmbeddingToImagePipeline.from_pretrained(folder)


def pipeline_size(pipe: Any) -> int:
    """Default output side of a pipeline in pixels (its denoiser's sample size x the VAE factor)."""
    return getattr(pipe, "default_size", None) or pipe.unet.config.sample_size * pipe.vae_scale_factor


def check_pipeline_embeddings(pipe: Any, embeddings: torch.Tensor, name: str = "embeddings") -> None:
    """Raise the pipeline's one-line ``ValueError`` for conditions of the wrong shape."""
    if hasattr(pipe, "check_embeddings"):
        pipe.check_embeddings(embeddings, name)
    else:
        pipe.projector.check_embeddings(embeddings, name)


def condition_encoder(pipe: Any, encoder: Any) -> Any:
    """Wrap an image encoder so it yields what ``pipe`` is conditioned on (PixCell: ``(B, T, D)`` crop tokens)."""
    num_tokens = getattr(pipe, "num_tokens", None)
    if num_tokens is None:
        return encoder
    from genpath.pipelines.pixcell import pixcell_tokens

    return lambda images: pixcell_tokens(encoder, images, num_tokens)


def load_embeddings(path: str | Path, name: str = "embeddings", ndims: tuple[int, ...] = (2,)) -> np.ndarray:
    """Read conditions ``(N,D)`` (or ``(N,T,D)`` when ``3 in ndims``) as float32 from a ``.npy`` file, never unpickling.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: one line naming ``name``: unreadable, empty, not numeric, of another rank, more
            than :data:`MAX_SAMPLES` rows, or NaN/inf (also after the conversion to float32).
    """
    path = Path(path)
    shapes = " or ".join({2: "(N,D)", 3: "(N,T,D)"}[n] for n in ndims)
    expected = f"{name}: expected a .npy file holding a non-empty {shapes} array of finite numbers"
    if not path.is_file():
        raise FileNotFoundError(f"{expected}, got {path} (missing)")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic != b"\x93NUMPY":  # not .npy: an archive, pickled data (never loaded), text or nothing
        raise ValueError(f"{expected}, got {path} ({'an empty file' if not magic else 'not a .npy file'})")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # mapped: the shape is checked before reading
    except Exception as error:  # noqa: BLE001 - numpy raises many error types on broken files
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{expected}, got {path} ({type(error).__name__}: {first})") from None
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{expected}, got dtype {array.dtype} in {path}")
    if array.ndim not in ndims or 0 in array.shape:
        raise ValueError(f"{expected}, got shape {array.shape} in {path}")
    if not array.shape[0] <= MAX_SAMPLES:
        raise ValueError(f"{name}: expected at most {MAX_SAMPLES} rows, got {array.shape[0]} in {path}")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, refused just below
        values = np.array(array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise ValueError(f"{expected}, got NaN or inf (or values beyond float32) in {path}")
    return values


def list_images(items: Iterable[str | Path], name: str) -> list[Path]:
    """Image files of files, folders and globs (:func:`genpath.io.images.expand_inputs`), errors naming ``name``."""
    from genpath.io.images import expand_inputs

    try:
        files = [path for path, _ in expand_inputs(items)]
    except FileNotFoundError as error:
        raise FileNotFoundError(re.sub(r"^inputs:", f"{name}:", str(error))) from None
    if not files:
        raise ValueError(f"{name}: expected at least one image file, got none in {list(map(str, items))}")
    return files


def embed_images(encoder: ImageEncoder, files: list[Path], name: str
                 ) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Embed each image file; one that cannot be read or embedded is a failure and the others go on.

    Returns:
        Embeddings ``(N,D)`` of the readable images, their paths, and ``(path, error)`` per failure.

    Raises:
        ValueError: naming ``name``, when no image could be embedded.
    """
    from genpath.io.images import read_image

    embeddings, names, failed = [], [], []
    with torch.no_grad():
        for path in files:
            try:
                embeddings.append(encoder(read_image(path)[None]))
            except (ValueError, OSError) as error:
                message = (str(error).strip().splitlines() or [type(error).__name__])[0]
                logger.info("%s: skipping %s: %s", name, path, message)
                failed.append((str(path), message))
                continue
            names.append(str(path))
    if not embeddings:
        raise ValueError(f"{name}: expected at least one readable image, got none of {len(files)}"
                         + (f" ({failed[0][1]})" if failed else ""))
    return torch.cat(embeddings), names, failed


def _conditions(cfg: SynthConfig, pipe: Any) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    if cfg.embeddings:
        embeddings = torch.from_numpy(load_embeddings(cfg.embeddings, ndims=(2, 3)))
        check_total(len(embeddings), cfg.n_per_condition)
        check_pipeline_embeddings(pipe, embeddings)
        return embeddings, [f"{Path(cfg.embeddings).name}[{i}]" for i in range(len(embeddings))], []
    files = list_images(cfg.from_images, "from_images")
    check_total(len(files), cfg.n_per_condition)  # before any image is read
    encoder = pipeline_encoder(cfg.model, allow_code=cfg.trust_model_code, encoder=cfg.encoder)
    return embed_images(condition_encoder(pipe, encoder), files, "from_images")


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the contents of ``paths``, in order (names do not count)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def model_fingerprint(folder: str | Path, exclude: str | Path | None = None) -> str:
    """SHA-256 over the names and contents of a model folder's config files (``*.json``, ``*.yaml``), not weights.

    Hidden files, anything under ``exclude`` (an output folder inside the model folder) and synth
    run folders inside it (their ``run.json``, zarr metadata, shards) do not count.
    """
    folder = Path(folder)
    skip = [Path(exclude).resolve()] if exclude is not None else []
    skip += [p.parent.resolve() for p in folder.rglob(RUN_FILE) if p.parent != folder and recorded_settings(p)]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".json", ".yaml", ".yml")
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                   and not any(p.resolve().is_relative_to(s) for s in skip))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(files_fingerprint([path])))
    return digest.hexdigest()


class RunFolder(NamedTuple):
    """An opened run folder: where it is, this run's sample ids, and what an earlier run finished."""

    out: Path
    ids: range
    manifest: Path
    previous: list[dict[str, str]]
    rows: list[dict[str, str]]
    done: set[int]


def open_run_folder(cfg: Any, settings: dict, n_total: int) -> RunFolder:  # noqa: ANN401 - a synth config
    """Prepare ``cfg.out`` for ``settings`` (``cfg.shard``'s samples of ``n_total``) and read its manifest.

    ``previous`` are the manifest's rows, ``rows`` its finished sample rows (failed inputs dropped)
    and ``done`` their ids.
    """
    out = Path(cfg.out)
    record, ids = shard_settings(settings, n_total, cfg.batch_size, cfg.shard)
    prepare_run_folder(out, record, cfg.overwrite)
    manifest = out / "manifest.csv"
    previous = read_manifest(manifest)
    rows = done_rows(previous)
    return RunFolder(out, ids, manifest, previous, rows, {int(r["id"]) for r in rows})


def save_rows(manifest: Path, rows: list[dict], failed: list[dict], fields: Any,  # noqa: ANN401 - field names
              progress: Callable[[int, int], None] | None, total: int) -> None:
    """Sort the finished ``rows`` by id, rewrite the manifest (failed inputs last) and report progress."""
    rows.sort(key=lambda r: int(r["id"]))
    atomic_write_csv(manifest, rows + failed, fields)
    if progress:
        progress(len(rows), total)


def finish_run(cfg: Any, out: Path, rows: list[dict], failed: list[dict]) -> list[dict]:  # noqa: ANN401
    """Write the run's extras (not a shard's: they come with the merge); return the manifest rows, failed last."""
    if cfg.shard is None:  # a shard's extras come with the merge
        from genpath.report.synth import write_synth_extras

        write_synth_extras(out)
    return rows + failed


def batches(n_total: int | range, done: set[int], batch_size: int) -> Iterable[list[int]]:
    """Sample ids ``0..n_total-1`` (or of a range) not in ``done``, ``batch_size`` at a time (never all in one list)."""
    pending = (i for i in (range(n_total) if isinstance(n_total, int) else n_total) if i not in done)
    while ids := list(itertools.islice(pending, batch_size)):
        yield ids


def _plan(cfg: SynthConfig) -> tuple[Any, torch.Tensor, list[str], list[tuple[str, str]], int, dict]:
    """Load the pipeline and the conditions, check everything; the settings that decide the samples."""
    folder = check_pretrained_folder(cfg.model, "model", "EmbeddingToImagePipeline or PixCell folder")
    pipe = load_synth_pipeline(folder, cfg.vae)
    with LOAD_LOCK:
        embeddings, sources, failed_inputs = _conditions(cfg, pipe)
    size = cfg.size or pipeline_size(pipe)
    pipe.check_inputs(embeddings, size, size, cfg.steps, cfg.guidance, "pt")  # fail before any compute
    out = Path(cfg.out)
    inputs = [cfg.embeddings] if cfg.embeddings else sources
    check_inputs_outside(out, inputs + [p for p, _ in failed_inputs], "embeddings" if cfg.embeddings else "from_images")
    settings = {"command": "synth", "model": str(folder.resolve()), "model_config": model_fingerprint(folder, out),
                "conditions": files_fingerprint(inputs), "n_conditions": len(sources),
                "n_per_condition": cfg.n_per_condition, "seed": cfg.seed, "steps": cfg.steps,
                "guidance": cfg.guidance, "size": size, "output_format": cfg.output_format,
                **component_settings(cfg.vae, cfg.encoder)}
    return pipe, embeddings, sources, failed_inputs, size, settings


def component_settings(vae: str | None, encoder: str | None) -> dict[str, str]:
    """Return what ``run.json`` records of a given VAE (path, config fingerprint) and encoder (only those given)."""
    settings = {}
    if vae is not None:
        settings.update(vae=str(Path(vae).resolve()), vae_config=model_fingerprint(vae))
    if encoder is not None:
        settings["encoder"] = encoder
    return settings


def synth_plan(cfg: SynthConfig) -> tuple[dict, int]:
    """Return the settings ``run.json`` records for ``cfg`` (unsharded) and its sample count; checks all inputs."""
    *_, settings = _plan(cfg)
    return settings, settings["n_conditions"] * cfg.n_per_condition


def run_synth(cfg: SynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate (or finish generating) a synthetic dataset; returns the manifest rows (failed inputs last).

    With ``cfg.shard`` only that part of the samples; with ``cfg.executor == "dask"`` all shards on
    a dask cluster, merged into ``cfg.out`` (:func:`genpath.synth_shards.run_sharded`).
    """
    if cfg.executor == "dask":
        return run_sharded(cfg, run_synth, synth_plan, progress)
    pipe, embeddings, sources, failed_inputs, size, settings = _plan(cfg)
    n_total = len(sources) * cfg.n_per_condition
    out, ids, manifest, previous, rows, done = open_run_folder(cfg, settings, n_total)
    with atomic_path(out / "embeddings.npy") as tmp:
        np.save(tmp, embeddings.numpy())
    failed = [{"id": "", "condition": "", "source": path, "seed": "", "model": str(cfg.model), "guidance": "",
               "steps": "", "file": "", "status": "failed", "error": error} for path, error in failed_inputs]
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
    if done:
        logger.info("resuming %s: %d of %d samples done", out, len(done), len(ids))
    if failed or len(previous) != len(rows):  # record this run's failed inputs even when nothing is left to do
        atomic_write_csv(manifest, rows + failed, MANIFEST_FIELDS)
    for batch in batches(ids, done, cfg.batch_size):
        conds = [i // cfg.n_per_condition for i in batch]
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in batch]
        with torch.no_grad():
            images = pipe(embeddings[conds], height=size, width=size, num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance, generator=generators).images
        uint8 = (images * 255).round().to(torch.uint8).cpu()
        for sample_id, cond, image in zip(batch, conds, uint8, strict=True):
            if images_array is not None:
                images_array[sample_id] = image.numpy()
                file = f"images.zarr/images[{sample_id}]"
            else:
                from genpath.io.images import write_image

                file = f"images/cond{cond:05d}_{sample_id % cfg.n_per_condition:03d}.png"
                write_image(image, out / file)
            rows.append({"id": sample_id, "condition": cond, "source": sources[cond], "seed": cfg.seed + sample_id,
                         "model": str(cfg.model), "guidance": cfg.guidance, "steps": cfg.steps, "file": file,
                         "status": "done", "error": ""})
        save_rows(manifest, rows, failed, MANIFEST_FIELDS, progress, len(ids))
    return finish_run(cfg, out, rows, failed)
