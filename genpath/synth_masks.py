"""Labelled synthetic data from nuclei masks: ``genpath synth --masks`` with a MaskToImagePipeline.

1. Masks: a ``.npz`` file (``instances`` or ``nuc_raster`` ``(H,W)``/``(N,H,W)``, optional
   ``types``) or a folder of such files and 16-bit label images; larger masks are cut into
   ``tile``-pixel tiles (mask tiles without nuclei are skipped).
2. Optional style: images whose embeddings (the pipeline's ``encoder.json``) are cycled over the
   masks; without them the null tokens give the model's unconditional style.
3. Samples ``(mask i, k)`` use seed ``seed + i·n + k``; output ``OUT/pairs.zarr`` (``images``
   ``(N,3,H,W)`` uint8, ``instances``/``types`` ``(N,H,W)`` int32, one chunk per sample) or
   ``OUT/images/*.png`` + ``OUT/masks/*.npz``; ``OUT/manifest.csv`` is rewritten atomically per
   batch and a rerun skips what it lists.
4. Settings: ``OUT/run.json`` (:func:`genpath.synth_shards.prepare_run_folder`) records the model and a
   fingerprint of its config files, of the masks and of the style images, n, seed, steps,
   guidance, ControlNet scale, tile and format; a rerun with other settings is refused unless
   ``overwrite`` (which deletes only what a synth run writes).
5. Bad input: in a folder of masks, a file that cannot be read (or holds no valid label map) is
   a *failed* manifest row (``status`` ``failed``, ``error``, no id), like an unreadable style
   image; the rest is used. Everything else is one line naming the argument before any output is
   written: a single bad ``masks`` file (also a 1-D or 4-D array), a ``tile`` that is not a
   positive multiple of the VAE factor, NaN/inf ``guidance``/``controlnet_scale``, more than
   :data:`genpath.synth.MAX_SAMPLES` samples (or tiles) in all, or a ``batch_size`` above
   :data:`genpath.synth.MAX_BATCH_SIZE`.
6. Scale: ``shard`` and ``executor="dask"`` as in :mod:`genpath.synth` (:mod:`genpath.synth_shards`).

The pipeline loads with ``MaskToImagePipeline.from_pretrained`` (a full pipeline folder or a
ControlNet folder with ``base.json``), or, for PixCell's cell-mask ControlNet folder
(``PixCellControlNetPipeline``), with :class:`~genpath.pipelines.pixcell_controlnet.PixCellControlNetPipeline`
and the SD3.5 VAE given as ``vae``; style images are then embedded with ``encoder`` (``uni2-h:PATH``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.io.images import write_image
from genpath.masks import check_masks
from genpath.pipelines.checks import MAX_CONDITIONING_SCALE, MAX_GUIDANCE, check_number, check_size
from genpath.pipelines.loading import check_pretrained_folder, pipeline_class_name
from genpath.pipelines.mask_to_image import MaskToImagePipeline
from genpath.synth import (
    MAX_BATCH_SIZE,
    MAX_SAMPLES,
    batches,
    check_count,
    check_seed,
    check_total,
    component_settings,
    condition_encoder,
    embed_images,
    files_fingerprint,
    finish_run,
    list_images,
    model_fingerprint,
    open_run_folder,
    pipeline_encoder,
    save_rows,
)
from genpath.synth_shards import (
    LOAD_LOCK,
    check_executor,
    check_inputs_outside,
    run_sharded,
)
from genpath.utils.atomic import atomic_path, atomic_write_csv
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

MASK_MANIFEST_FIELDS = ("id", "mask", "mask_source", "style", "seed", "model", "controlnet_scale", "guidance",
                        "steps", "file", "mask_file", "status", "error")
Mask = tuple[str, torch.Tensor, torch.Tensor | None]


@dataclass
class MaskSynthConfig:
    """Settings of ``genpath synth --masks`` (see module doc)."""

    model: str
    out: str
    masks: str
    style_from: list[str] = field(default_factory=list)
    n_per_mask: int = 1
    output_format: str = "zarr"
    seed: int = 0
    controlnet_scale: float = 1.0
    guidance: float = 2.0
    steps: int = 25
    batch_size: int = 8
    tile: int | None = None
    overwrite: bool = False
    base: str | None = None
    trust_model_code: bool = False
    shard: str | None = None
    executor: str = "local"
    workers: int = 1
    scheduler: str | None = None
    vae: str | None = None
    encoder: str | None = None

    def __post_init__(self) -> None:
        if self.output_format not in ("zarr", "png"):
            raise ValueError(f"output_format: expected 'zarr' or 'png', got {self.output_format!r}")
        check_count(self.n_per_mask, "n_per_mask (--n-per-condition)", MAX_SAMPLES)
        check_count(self.batch_size, "batch_size", MAX_BATCH_SIZE)
        check_count(self.steps, "steps", 10_000)
        check_seed(self.seed)
        check_number(self.guidance, "guidance", 0.0, MAX_GUIDANCE, "1 = no guidance")
        check_number(self.controlnet_scale, "controlnet_scale", 0.0, MAX_CONDITIONING_SCALE, "0 ignores the mask")
        if self.tile is not None:
            check_count(self.tile, "tile", 2**31 - 1)
        check_executor(self.executor, self.workers, self.shard, self.scheduler)


def _read_mask_file(path: Path) -> list[Mask]:
    """Read the masks of one ``.npz`` (``(H,W)``/``(N,H,W)``) or label image; a problem is a ValueError naming masks."""
    from genpath.training.mask_data import read_label_map

    try:
        if path.suffix.lower() != ".npz":
            return [(path.name, read_label_map(path), None)]
        with open(path, "rb") as handle:
            if handle.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # else numpy would try to unpickle
                raise ValueError(f"masks: expected a readable .npz or label image, got {path} (not a .npz archive)")
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in ("instances", "nuc_raster") if k in data.files), None)
            if key is None:
                raise ValueError(f"masks: expected an 'instances' or 'nuc_raster' array in {path}, got {data.files}")
            inst = data[key]
            types = data["types"] if "types" in data.files else None
    except ValueError as error:
        if str(error).startswith("masks:"):
            raise
        raise ValueError(f"masks: expected a readable label map, got {path} ({error})") from None
    except Exception as error:  # noqa: BLE001 - numpy, zipfile and Pillow raise many error types on broken files
        first = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"masks: expected a readable .npz or label image, got {path} "
                         f"({type(error).__name__}: {first})") from None
    for array in (inst, types):
        if array is not None and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"masks: expected integer label maps in {path}, got {array.dtype}")
    if inst.ndim not in (2, 3) or 0 in inst.shape[-2:]:
        raise ValueError(f"masks: expected label maps (H,W) or (N,H,W) in {path}, got shape {inst.shape}")
    if types is not None and types.shape != inst.shape:
        raise ValueError(f"masks: expected types of shape {inst.shape} like the instances in {path}, "
                         f"got {types.shape}")
    inst_t = torch.from_numpy(inst.astype(np.int64))
    types_t = None if types is None else torch.from_numpy(types.astype(np.int64))
    try:
        check_masks(inst_t, types_t, 0, "masks")
    except ValueError as error:
        raise ValueError(f"{error} in {path}") from None
    if inst_t.ndim == 2:
        return [(path.name, inst_t, types_t)]
    return [(f"{path.name}[{i}]", inst_t[i], None if types_t is None else types_t[i]) for i in range(inst_t.shape[0])]


def load_mask_files(source: str | Path, failed: list[tuple[str, str]] | None = None) -> list[Mask]:
    """Read ``(name, instances (H,W), types (H,W) or None)`` from a ``.npz``/label image or a folder of them.

    Args:
        source: a ``.npz`` file, a label image, or a folder of them.
        failed: when given, a file of a folder that cannot be read is appended to it as
            ``(path, error)`` and skipped; otherwise (and always for a single file) it is an error.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a bad file (see ``failed``), or no mask at all.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".npz", ".png", ".tif", ".tiff")
                       and not p.name.startswith("."))
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"masks: expected a .npz file, a label image or a folder of them, got {source}")
    out: list[Mask] = []
    for path in files:
        try:
            out.extend(_read_mask_file(path))
        except ValueError as error:
            if failed is None or not source.is_dir():
                raise
            logger.info("masks: skipping %s: %s", path, error)
            failed.append((str(path), str(error)))
    if not out:
        raise ValueError(f"masks: expected at least one mask in {source}, got none"
                         + (f" ({len(failed)} unreadable: {failed[0][1]})" if failed else ""))
    return out


def tile_masks(masks: list[Mask], tile: int | None):  # noqa: ANN201
    """Cut masks into ``tile``-pixel tiles that hold nuclei (all masks must then share one size otherwise)."""
    if tile is None:
        return masks
    most = sum((inst.shape[0] // tile) * (inst.shape[1] // tile) for _, inst, _ in masks)
    if not most <= MAX_SAMPLES:
        raise ValueError(f"tile: expected at most {MAX_SAMPLES} tiles in all, got up to {most} of {tile}px")
    out = []
    for name, inst, types in masks:
        h, w = inst.shape
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                crop = inst[y : y + tile, x : x + tile]
                if bool((crop > 0).any()):
                    out.append((f"{name}@{y},{x}", crop, None if types is None else types[y : y + tile, x : x + tile]))
    if not out:
        raise ValueError(f"tile: expected masks of at least {tile}px holding nuclei, got none")
    return out


def masks_fingerprint(masks: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> str:
    """SHA-256 over the names, shapes and label values of the (tiled) masks, in order."""
    digest = hashlib.sha256()
    for name, inst, types in masks:
        digest.update(f"{name}\0{tuple(inst.shape)}\0".encode())
        for array in (inst, types):
            digest.update(b"-" if array is None else array.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:  # keeps the .npz suffix, so numpy adds none
        np.savez_compressed(tmp, **arrays)


def _plan(cfg: MaskSynthConfig) -> tuple:
    """Load the pipeline, masks and styles, check everything; the settings that decide the samples."""
    folder = check_pretrained_folder(cfg.model, "model", "MaskToImagePipeline or ControlNet folder")
    base = check_pretrained_folder(cfg.base, "base", "EmbeddingToImagePipeline folder") if cfg.base else None
    pipe = load_mask_pipeline(folder, base, cfg.vae)
    if cfg.tile is not None:
        check_size(cfg.tile, "tile", pipe.vae_scale_factor)
    mask_failures: list[tuple[str, str]] = []
    masks = tile_masks(load_mask_files(cfg.masks, mask_failures), cfg.tile)
    check_total(len(masks), cfg.n_per_mask, "n_per_mask (--n-per-condition)", "masks")
    shapes = {tuple(m[1].shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks: expected one mask size (use --tile), got sizes {sorted(shapes)}")
    h, w = shapes.pop()
    for _, inst, types in masks:  # fail before any compute
        pipe.check_inputs(inst, types, None, cfg.steps, cfg.guidance, cfg.controlnet_scale)
    styles, style_names, style_failures = None, [], []
    if cfg.style_from:
        files = list_images(cfg.style_from, "style_from")
        with LOAD_LOCK:
            encoder = pipeline_encoder(folder, allow_code=cfg.trust_model_code, encoder=cfg.encoder)
        styles, style_names, style_failures = embed_images(condition_encoder(pipe, encoder), files, "style_from")
    out = Path(cfg.out)
    check_inputs_outside(out, [cfg.masks], "masks")
    check_inputs_outside(out, style_names + [p for p, _ in style_failures], "style_from")
    settings = {"command": "synth --masks", "model": str(folder.resolve()),
                "model_config": model_fingerprint(folder, out), "masks": masks_fingerprint(masks),
                "base": str(base.resolve()) if base else None,
                "n_masks": len(masks), "style": files_fingerprint(style_names), "n_styles": len(style_names),
                "n_per_condition": cfg.n_per_mask, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance,
                "controlnet_scale": cfg.controlnet_scale, "tile": cfg.tile, "output_format": cfg.output_format,
                **component_settings(cfg.vae, cfg.encoder)}
    return pipe, masks, (styles, style_names), (mask_failures, style_failures), (h, w), settings


def load_mask_pipeline(folder: Path, base: Path | None = None, vae: str | None = None) -> Any:
    """Load a MaskToImagePipeline (or ControlNet + ``base``) folder, or PixCell's cell-mask ControlNet with ``vae``."""
    with LOAD_LOCK:
        if pipeline_class_name(folder) == "PixCellControlNetPipeline":
            if base is not None:
                raise ValueError(f"base: expected only with a genpath ControlNet folder, got one for the PixCell "
                                 f"ControlNet {folder} (it holds its own transformer)")
            from genpath.pipelines.pixcell_controlnet import PixCellControlNetPipeline

            return PixCellControlNetPipeline.from_pretrained(folder, vae=vae)
        if vae is not None:
            raise ValueError(f"vae: expected only with a PixCell ControlNet folder (the SD3.5 VAE it lacks), got {vae} "
                             f"for {folder}")
        return MaskToImagePipeline.from_pretrained(folder, **({"base": base} if base else {}))


def mask_synth_plan(cfg: MaskSynthConfig) -> tuple[dict, int]:
    """Return the settings ``run.json`` records for ``cfg`` (unsharded) and its sample count; checks all inputs."""
    *_, settings = _plan(cfg)
    return settings, settings["n_masks"] * cfg.n_per_mask


def run_mask_synth(cfg: MaskSynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate (or finish generating) an (image, mask) dataset; returns the manifest rows (failed inputs last).

    With ``cfg.shard`` only that part of the samples; with ``cfg.executor == "dask"`` all shards on
    a dask cluster, merged into ``cfg.out`` (:func:`genpath.synth_shards.run_sharded`).
    """
    if cfg.executor == "dask":
        return run_sharded(cfg, run_mask_synth, mask_synth_plan, progress)
    pipe, masks, (styles, style_names), (mask_failures, style_failures), (h, w), settings = _plan(cfg)
    n_total = len(masks) * cfg.n_per_mask
    out, ids, manifest, previous, rows, done = open_run_folder(cfg, settings, n_total)
    blank = dict.fromkeys(MASK_MANIFEST_FIELDS, "")
    failed = [{**blank, "mask_source": path, "model": str(cfg.model), "status": "failed", "error": error}
              for path, error in mask_failures]
    failed += [{**blank, "style": path, "model": str(cfg.model), "status": "failed", "error": error}
               for path, error in style_failures]
    arrays = None
    if cfg.output_format == "zarr":
        import zarr

        group = zarr.open_group(str(out / "pairs.zarr"), mode="a")
        if "images" not in group or group["images"].shape != (n_total, 3, h, w):
            group.create_array("images", shape=(n_total, 3, h, w), chunks=(1, 3, h, w), dtype="uint8", overwrite=True)
            for key in ("instances", "types"):
                group.create_array(key, shape=(n_total, h, w), chunks=(1, h, w), dtype="int32", overwrite=True)
            done, rows = set(), []
        arrays = group
    if done:
        logger.info("resuming %s: %d of %d samples done", out, len(done), len(ids))
    if failed or len(previous) != len(rows):  # record this run's failed inputs even when nothing is left to do
        atomic_write_csv(manifest, rows + failed, MASK_MANIFEST_FIELDS)
    for batch in batches(ids, done, cfg.batch_size):
        mask_ids = [i // cfg.n_per_mask for i in batch]
        inst = torch.stack([masks[m][1] for m in mask_ids])
        types = torch.stack([masks[m][2] if masks[m][2] is not None else torch.zeros_like(masks[m][1])
                             for m in mask_ids])
        inst, types = check_masks(inst, types, pipe.config.num_types, "masks")
        emb = None if styles is None else styles[[m % len(styles) for m in mask_ids]]
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in batch]
        images = pipe(inst, types if pipe.config.num_types else None, embeddings=emb,
                      controlnet_conditioning_scale=cfg.controlnet_scale, guidance_scale=cfg.guidance,
                      num_inference_steps=cfg.steps, generator=generators).images
        uint8 = (images * 255).round().to(torch.uint8).cpu()
        for j, (sample_id, m) in enumerate(zip(batch, mask_ids, strict=True)):
            if arrays is not None:
                arrays["images"][sample_id] = uint8[j].numpy()
                arrays["instances"][sample_id] = inst[j].numpy().astype(np.int32)
                arrays["types"][sample_id] = types[j].numpy().astype(np.int32)
                file, mask_file = f"pairs.zarr/images[{sample_id}]", f"pairs.zarr/instances[{sample_id}]"
            else:
                file, mask_file = f"images/{sample_id:06d}.png", f"masks/{sample_id:06d}.npz"
                _save_npz(out / mask_file, instances=inst[j].numpy().astype(np.int32),
                          types=types[j].numpy().astype(np.int32))
                write_image(uint8[j], out / file)
            rows.append({"id": sample_id, "mask": m, "mask_source": masks[m][0],
                         "style": style_names[m % len(style_names)] if style_names else "",
                         "seed": cfg.seed + sample_id, "model": str(cfg.model),
                         "controlnet_scale": cfg.controlnet_scale, "guidance": cfg.guidance, "steps": cfg.steps,
                         "file": file, "mask_file": mask_file, "status": "done", "error": ""})
        save_rows(manifest, rows, failed, MASK_MANIFEST_FIELDS, progress, len(ids))
    return finish_run(cfg, out, rows, failed)
