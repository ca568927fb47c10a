"""``genpath embed``: embeddings of a tile dataset's tiles with any registered encoder, and MIL bags per slide.

Embeddings go to ``DATASET.zarr/embeddings/<encoder name>``: ``(N,D)`` float32 (or float16), row
``i`` for tile ``i``. The array's attributes record the encoder, its weights, the dtype and
``done``, the rows computed so far, rewritten (atomically) after every batch: a rerun continues
from there, and a dataset that has grown since (more slides tiled) gets its new rows only.

Bags (``bags=DIR``): one file per slide with ``features`` ``(n,D)`` float32 and ``coords``
``(n,2)`` level-0 ``(x, y)``, the layout MIL codebases (CLAM, TRIDENT) read: ``.pt`` (a
``torch.save`` dict of two tensors) or ``.h5`` (two datasets; needs ``h5py``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genpath.utils.atomic import atomic_path
from genpath.utils.logging import get_logger
from genpath.wsi.tile_dataset import open_tile_dataset

logger = get_logger(__name__)


@dataclass
class EmbedConfig:
    """A ``genpath embed`` run.

    Attributes:
        dataset: a dataset made by ``genpath tiles``.
        encoder: a registered encoder name, optionally with local weights: ``NAME:WEIGHTS``
            (``path`` of ``genpath-small``/``torchscript``, ``checkpoint_path`` of ``timm.ARCH`` and the presets).
        batch_size: tiles per encoder call.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
        dtype: stored dtype, ``float32`` or ``float16``.
        bags: write one bag per slide into this folder (None: no bags).
        bags_format: ``pt`` or ``h5``.
        overwrite: recompute embeddings stored under the same name with another encoder/weights/dtype.
    """

    dataset: str
    encoder: str
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "float32"
    bags: str | None = None
    bags_format: str = "pt"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 65536:
            raise ValueError(f"batch-size: expected 1..65536 tiles, got {self.batch_size}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype: expected float32 or float16, got {self.dtype!r}")
        if self.bags_format not in ("pt", "h5"):
            raise ValueError(f"bags-format: expected pt or h5, got {self.bags_format!r}")
        if not (self.device == "auto" or self.device in ("cpu", "mps") or self.device.startswith("cuda")):
            raise ValueError(f"device: expected auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if self.bags is not None and Path(self.bags).exists() and not Path(self.bags).is_dir():
            raise ValueError(f"bags: expected a folder, got the existing file {self.bags}")


def parse_encoder(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``NAME[:WEIGHTS]`` into the registry name and the keyword arguments of its weights.

    ``WEIGHTS`` goes to the keyword the encoder's family registered (``path`` for folders and
    TorchScript files, ``checkpoint_path`` for timm and the published presets).

    Example:
        >>> parse_encoder("genpath-small:out/enc")
        ('genpath-small', {'path': 'out/enc'})
        >>> parse_encoder("timm.vit_small_patch16_224:uni.bin")
        ('timm.vit_small_patch16_224', {'checkpoint_path': 'uni.bin'})
        >>> parse_encoder("uni2-h:models/uni2-h/pytorch_model.bin")
        ('uni2-h', {'checkpoint_path': 'models/uni2-h/pytorch_model.bin'})
    """
    from genpath.encoders.registry import weights_argument

    name, sep, weights = spec.partition(":")
    if not name or (sep and not weights):
        raise ValueError(f"encoder: expected NAME or NAME:WEIGHTS (a registered encoder), got {spec!r}")
    if not sep:
        return name, {}
    return name, {weights_argument(name): weights}


def resolve_device(device: str) -> torch.device:
    """Return the device ``auto`` picks (CUDA, then MPS, then CPU), or check an explicit one."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: expected an available device, got {device!r} (no CUDA here; use auto or cpu)")
    return torch.device(device)


def build_encoder(spec: str) -> tuple[str, dict[str, Any], torch.nn.Module]:
    """Create the registered encoder of ``NAME[:WEIGHTS]``; an unknown name is a one-line ``ValueError``."""
    from genpath.encoders import create_encoder, list_encoders

    name, kwargs = parse_encoder(spec)
    try:
        encoder = create_encoder(name, **kwargs)
    except KeyError:
        raise ValueError(f"encoder: expected one of {list_encoders()} (optionally NAME:WEIGHTS), "
                         f"got {name!r}") from None
    return name, kwargs, encoder


def _embedding_array(group, name: str, record: dict[str, Any], n: int, dim: int, overwrite: bool,  # noqa: ANN001
                     where: str = "the dataset"):  # noqa: ANN202 - a zarr.Array
    """Open (checking what it was computed with) or create ``embeddings/<name>``, sized to ``n`` rows."""
    parent = group.require_group("embeddings")
    if name in parent:
        array = parent[name]
        stored = {k: array.attrs.get(k) for k in record}
        if stored != record and not overwrite:
            key = next(k for k in record if stored[k] != record[k])
            raise ValueError(f"{key}: expected {stored[key]} as in {where}/embeddings/{name}, got "
                             f"{record[key]} (pass --overwrite to recompute)")
        if stored != record:
            del parent[name]
    if name not in parent:
        chunk = max(1, min(4096, (1 << 22) // max(1, dim * 4)))
        array = parent.create_array(name, shape=(n, dim), chunks=(chunk, dim), dtype=record["dtype"])
        array.attrs.update({**record, "done": 0})
    array = parent[name]
    if array.shape[0] != n:
        array.resize((n, dim))
    return array


def run_embed(cfg: EmbedConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Embed every tile of ``cfg.dataset`` not embedded yet; then write bags if asked.

    Args:
        cfg: the run.
        progress: ``(done, total)`` rows after each batch.

    Returns:
        ``{name, n_tiles, embed_dim, computed, device, seconds, bags}`` (``bags``: files written).

    Raises:
        ValueError: not a tile dataset, an unknown encoder, other settings under the same name.
        FileNotFoundError: missing weights.
    """
    import time

    group = open_tile_dataset(cfg.dataset, mode="r+")
    n = int(group.attrs["n_tiles"])
    name, kwargs, encoder = build_encoder(cfg.encoder)
    device = resolve_device(cfg.device)
    weights = {k: str(Path(v).resolve()) for k, v in kwargs.items()}
    record = {"encoder": name, "weights": weights or None, "dtype": cfg.dtype, "embed_dim": int(encoder.embed_dim)}
    array = _embedding_array(group, name, record, n, int(encoder.embed_dim), cfg.overwrite, str(cfg.dataset))
    done = min(int(array.attrs.get("done", 0)), n)
    encoder = encoder.to(device)
    images = group["images"]
    starts = list(range(done, n, cfg.batch_size))
    start_time = time.perf_counter()
    logger.info("embedding %d of %d tiles of %s with %s on %s", n - done, n, cfg.dataset, name, device)
    with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
        upcoming = pool.submit(images.__getitem__, slice(starts[0], starts[0] + cfg.batch_size)) if starts else None
        for i, start in enumerate(starts):
            batch = upcoming.result()
            if i + 1 < len(starts):  # decode the next batch while this one is embedded
                upcoming = pool.submit(images.__getitem__, slice(starts[i + 1], starts[i + 1] + cfg.batch_size))
            stop = min(start + cfg.batch_size, n)
            features = encoder(torch.from_numpy(batch[: stop - start]).to(device)).float().cpu().numpy()
            if not np.isfinite(features).all():
                raise ValueError(f"encoder: expected finite embeddings, got NaN/inf for tiles {start}..{stop - 1}")
            array[start:stop] = features.astype(cfg.dtype)
            array.attrs.update({"done": stop})
            if progress:
                progress(stop, n)
    seconds = time.perf_counter() - start_time
    written = export_bags(cfg.dataset, name, cfg.bags, cfg.bags_format) if cfg.bags else []
    return {"name": name, "n_tiles": n, "embed_dim": int(encoder.embed_dim), "computed": n - done,
            "device": str(device), "seconds": seconds, "bags": written}


def _bag_names(slides: list[dict[str, Any]]) -> list[str]:
    """Return a file stem per slide: its name without slide suffixes; repeated names get ``-<index>``."""
    stems = []
    for row in slides:
        name = Path(row["path"]).name
        for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
            name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
        stems.append(Path(name).stem)
    return [f"{s}-{i}" if stems.count(s) > 1 else s for i, s in enumerate(stems)]


def export_bags(dataset: str | Path, name: str, out: str | Path, bags_format: str = "pt") -> list[Path]:
    """Write one bag per tiled slide (``features`` float32 ``(n,D)``, ``coords`` int64 ``(n,2)``) into ``out``.

    Raises:
        ValueError: embeddings ``name`` missing or not complete, or ``h5`` without ``h5py``.
    """
    group = open_tile_dataset(dataset)
    n = int(group.attrs["n_tiles"])
    if "embeddings" not in group or name not in group["embeddings"]:
        raise ValueError(f"embeddings: expected embeddings/{name} in {dataset}, got none (run genpath embed)")
    array = group["embeddings"][name]
    if int(array.attrs.get("done", 0)) < n or array.shape[0] < n:
        raise ValueError(f"embeddings: expected all {n} rows of embeddings/{name}, got {array.attrs.get('done')}")
    if bags_format == "h5":
        try:
            import h5py
        except ImportError:
            raise ValueError("bags-format: expected the h5py package for .h5 bags, got none (use pt)") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slides = list(group.attrs["slides"])
    coords_array, written = group["coords"], []
    tile_size, mpp = int(group.attrs["tile_size"]), float(group.attrs["mpp"])
    for row, stem in zip(slides, _bag_names(slides), strict=True):
        if row["status"] != "done" or not row["n_tiles"]:
            continue
        a, b = int(row["offset"]), int(row["offset"]) + int(row["n_tiles"])
        features = np.asarray(array[a:b], np.float32)
        coords = np.asarray(coords_array[a:b], np.int64)
        path = out / f"{stem}.{bags_format}"
        with atomic_path(path) as tmp:
            if bags_format == "pt":
                torch.save({"features": torch.from_numpy(features), "coords": torch.from_numpy(coords)}, tmp)
            else:
                with h5py.File(tmp, "w") as handle:
                    handle.create_dataset("features", data=features)
                    handle.create_dataset("coords", data=coords)
                    handle["coords"].attrs["patch_size"] = tile_size
                    handle["coords"].attrs["patch_size_level0"] = round(tile_size * mpp / float(row["mpp"]))
        written.append(path)
    logger.info("wrote %d bags to %s", len(written), out)
    return written


__all__ = ["EmbedConfig", "build_encoder", "export_bags", "parse_encoder", "resolve_device", "run_embed"]
