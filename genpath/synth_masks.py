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
4. Settings: ``OUT/run.json`` (:func:`genpath.synth.prepare_run_folder`) records the model and a
   fingerprint of its config files, of the masks and of the style images, n, seed, steps,
   guidance, ControlNet scale, tile and format; a rerun with other settings is refused unless
   ``overwrite`` (which deletes only what a synth run writes).

The pipeline loads with ``MaskToImagePipeline.from_pretrained`` (a full pipeline folder or a
ControlNet folder with ``base.json``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from genpath.encoders.reference import load_encoder_reference
from genpath.io.images import expand_inputs, read_image, write_image
from genpath.masks import check_masks
from genpath.pipelines.loading import check_pretrained_folder
from genpath.pipelines.mask_to_image import MaskToImagePipeline
from genpath.synth import check_inputs_outside, files_fingerprint, model_fingerprint, prepare_run_folder, read_manifest
from genpath.utils.atomic import atomic_path, atomic_write_csv
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

MASK_MANIFEST_FIELDS = ("id", "mask", "mask_source", "style", "seed", "model", "controlnet_scale", "guidance",
                        "steps", "file", "mask_file")


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

    def __post_init__(self) -> None:
        if self.output_format not in ("zarr", "png"):
            raise ValueError(f"output_format: expected 'zarr' or 'png', got {self.output_format!r}")
        for name in ("n_per_mask", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")


def load_mask_files(source: str | Path) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """Read ``(name, instances (H,W), types (H,W) or None)`` from a ``.npz``/label image or a folder of them."""
    from genpath.training.mask_data import read_label_map

    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in (".npz", ".png", ".tif", ".tiff"))
    elif source.is_file():
        files = [source]
    else:
        raise FileNotFoundError(f"masks: expected a .npz file, a label image or a folder of them, got {source}")
    out: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for path in files:
        if path.suffix.lower() != ".npz":
            out.append((path.name, read_label_map(path), None))
            continue
        with np.load(path) as data:
            key = next((k for k in ("instances", "nuc_raster") if k in data.files), None)
            if key is None:
                raise ValueError(f"masks: expected an 'instances' or 'nuc_raster' array in {path}, got {data.files}")
            inst = data[key]
            types = data["types"] if "types" in data.files else None
        for array in (inst, types):
            if array is not None and not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"masks: expected integer label maps in {path}, got {array.dtype}")
        inst_t = torch.from_numpy(inst.astype(np.int64))
        types_t = None if types is None else torch.from_numpy(types.astype(np.int64))
        if inst_t.ndim == 2:
            out.append((path.name, inst_t, types_t))
        else:
            out.extend((f"{path.name}[{i}]", inst_t[i], None if types_t is None else types_t[i])
                       for i in range(inst_t.shape[0]))
    if not out:
        raise ValueError(f"masks: expected at least one mask in {source}, got none")
    return out


def tile_masks(masks: list[tuple[str, torch.Tensor, torch.Tensor | None]], tile: int | None):  # noqa: ANN201
    """Cut masks into ``tile``-pixel tiles that hold nuclei (all masks must then share one size otherwise)."""
    if tile is None:
        return masks
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


def run_mask_synth(cfg: MaskSynthConfig, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Generate (or finish generating) an (image, mask) dataset; returns the manifest rows."""
    folder = check_pretrained_folder(cfg.model, "model", "MaskToImagePipeline or ControlNet folder")
    base = check_pretrained_folder(cfg.base, "base", "EmbeddingToImagePipeline folder") if cfg.base else None
    pipe = MaskToImagePipeline.from_pretrained(folder, **({"base": base} if base else {}))
    masks = tile_masks(load_mask_files(cfg.masks), cfg.tile)
    shapes = {tuple(m[1].shape) for m in masks}
    if len(shapes) != 1:
        raise ValueError(f"masks: expected one mask size (use --tile), got sizes {sorted(shapes)}")
    h, w = shapes.pop()
    for _, inst, types in masks:  # fail before any compute
        pipe.check_inputs(inst, types, None, cfg.steps, cfg.guidance, cfg.controlnet_scale)
    styles, style_names = None, []
    if cfg.style_from:
        encoder = load_encoder_reference(folder, allow_code=cfg.trust_model_code)
        files = expand_inputs(cfg.style_from)
        with torch.no_grad():
            styles = torch.cat([encoder(read_image(p)[None]) for p, _ in files])
        style_names = [str(p) for p, _ in files]
    out = Path(cfg.out)
    check_inputs_outside(out, [cfg.masks], "masks")
    check_inputs_outside(out, style_names, "style_from")
    settings = {"command": "synth --masks", "model": str(folder.resolve()),
                "model_config": model_fingerprint(folder, out), "masks": masks_fingerprint(masks),
                "base": str(base.resolve()) if base else None,
                "n_masks": len(masks), "style": files_fingerprint(style_names), "n_styles": len(style_names),
                "n_per_condition": cfg.n_per_mask, "seed": cfg.seed, "steps": cfg.steps, "guidance": cfg.guidance,
                "controlnet_scale": cfg.controlnet_scale, "tile": cfg.tile, "output_format": cfg.output_format}
    prepare_run_folder(out, settings, cfg.overwrite)
    n_total = len(masks) * cfg.n_per_mask
    manifest = out / "manifest.csv"
    rows = read_manifest(manifest)
    done = {int(r["id"]) for r in rows}
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
    todo = [i for i in range(n_total) if i not in done]
    if done:
        logger.info("resuming %s: %d of %d samples done, %d to go", out, n_total - len(todo), n_total, len(todo))
    for start in range(0, len(todo), cfg.batch_size):
        ids = todo[start : start + cfg.batch_size]
        mask_ids = [i // cfg.n_per_mask for i in ids]
        inst = torch.stack([masks[m][1] for m in mask_ids])
        types = torch.stack([masks[m][2] if masks[m][2] is not None else torch.zeros_like(masks[m][1])
                             for m in mask_ids])
        inst, types = check_masks(inst, types, pipe.config.num_types, "masks")
        emb = None if styles is None else styles[[m % len(styles) for m in mask_ids]]
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in ids]
        images = pipe(inst, types if pipe.config.num_types else None, embeddings=emb,
                      controlnet_conditioning_scale=cfg.controlnet_scale, guidance_scale=cfg.guidance,
                      num_inference_steps=cfg.steps, generator=generators).images
        uint8 = (images * 255).round().to(torch.uint8).cpu()
        for j, (sample_id, m) in enumerate(zip(ids, mask_ids, strict=True)):
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
                         "file": file, "mask_file": mask_file})
        rows.sort(key=lambda r: int(r["id"]))
        atomic_write_csv(manifest, rows, MASK_MANIFEST_FIELDS)
        if progress:
            progress(len(rows), n_total)
    return rows
