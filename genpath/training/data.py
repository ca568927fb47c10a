"""Tile datasets for training: image folders (tiles, or random crops of large images) and zarr arrays.

Items are uint8 ``(3,S,S)`` tensors; augmentation happens on batches in the training step
(kornia, torch RNG), so datasets stay cheap and picklable for ``DataLoader`` workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from genpath.io.images import IMAGE_SUFFIXES, read_image


class TileFolderDataset(Dataset):
    """Tiles from image folders; images larger than ``size`` give ``crops_per_image`` random crops.

    Args:
        roots: folders (searched recursively) or image files.
        size: output side; smaller images are rejected with a clear error.
        crops_per_image: crops drawn per large image per epoch.
        seed: base seed of the crop positions (item ``i`` is deterministic given the seed).
        cache: keep decoded images in memory (small datasets).
        holdout: share of files (chosen by a stable hash of the file name) kept out of training.
        part: ``"train"`` (files outside the holdout) or ``"holdout"`` (only those), so that
            evaluation tiles are never seen in training.
    """

    def __init__(
        self,
        roots: Sequence[str | Path],
        size: int,
        crops_per_image: int = 8,
        seed: int = 0,
        cache: bool = True,
        holdout: float = 0.0,
        part: str = "train",
    ) -> None:
        files: list[Path] = []
        for root in roots:
            root = Path(root)
            if root.is_dir():
                files.extend(sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
            elif root.is_file():
                files.append(root)
            else:
                raise FileNotFoundError(f"roots: expected image folders or files, got {root} (missing)")
        if part not in ("train", "holdout"):
            raise ValueError(f"part: expected 'train' or 'holdout', got {part!r}")
        files = [f for f in files if in_holdout(f, holdout) == (part == "holdout")]
        if not files:
            raise ValueError(f"roots: expected at least one image in {list(map(str, roots))}, got none")
        self.files, self.size, self.seed, self.cache = files, int(size), int(seed), cache
        self._images: dict[int, torch.Tensor] = {}
        self.index: list[tuple[int, int]] = []
        for i, path in enumerate(files):
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
            if min(w, h) < size:
                raise ValueError(f"roots: expected images at least {size}px, got {w}x{h} in {path}")
            n = 1 if (w, h) == (size, size) or max(w, h) < 2 * size else crops_per_image
            self.index.extend((i, k) for k in range(n))

    def __len__(self) -> int:
        return len(self.index)

    def _image(self, i: int) -> torch.Tensor:
        if i in self._images:
            return self._images[i]
        image = read_image(self.files[i])
        if self.cache:
            self._images[i] = image
        return image

    def __getitem__(self, item: int) -> torch.Tensor:
        i, k = self.index[item]
        image = self._image(i)
        _, h, w = image.shape
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        y = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        x = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        return image[:, y : y + self.size, x : x + self.size].contiguous()


def in_holdout(path: str | Path, fraction: float) -> bool:
    """Whether a file belongs to the held-out share (stable across runs and machines)."""
    import zlib

    return fraction > 0 and (zlib.crc32(Path(path).name.encode()) % 10_000) < fraction * 10_000


class ZarrTileDataset(Dataset):
    """Tiles streamed from a zarr array ``(N,3,S,S)`` uint8 (chunked by tile), opened lazily per worker."""

    def __init__(self, path: str | Path, array: str = "tiles") -> None:
        import zarr

        self.path, self.array = str(path), array
        shape = zarr.open_group(self.path, mode="r")[array].shape
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"path: expected an (N,3,S,S) array '{array}', got shape {shape} in {path}")
        self.length = int(shape[0])
        self._z = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> torch.Tensor:
        if self._z is None:
            import zarr

            self._z = zarr.open_group(self.path, mode="r")[self.array]
        return torch.from_numpy(self._z[item])


def write_tile_zarr(tiles: torch.Tensor, path: str | Path, array: str = "tiles") -> Path:
    """Store uint8 tiles ``(N,3,S,S)`` as a zarr array chunked by tile."""
    import zarr

    if tiles.dtype != torch.uint8 or tiles.ndim != 4:
        raise ValueError(f"tiles: expected uint8 (N,3,S,S), got {tiles.dtype} {tuple(tiles.shape)}")
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array(array, shape=tuple(tiles.shape), chunks=(1, *tiles.shape[1:]), dtype="uint8")
    arr[:] = tiles.numpy()
    return Path(path)
