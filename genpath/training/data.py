"""Tile datasets for training: image folders (tiles, or random crops of large images) and zarr arrays.

Items are uint8 ``(3,S,S)`` tensors; augmentation happens on batches in the training step
(kornia, torch RNG), so datasets stay cheap and picklable for ``DataLoader`` workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
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
    """Tiles streamed from a zarr group (opened lazily per worker), optionally with precomputed embeddings.

    Reads ``images`` (a ``genpath tiles`` dataset) or ``tiles`` (:func:`write_tile_zarr`), uint8
    ``(N,3,S,S)`` or ``(N,S,S,3)``. A ``genpath tiles`` dataset counts only its committed rows
    (``n_tiles``). Tiles larger than ``size`` are center-cropped to it; smaller ones are refused.

    Args:
        path: the zarr group.
        array: the tile array; None picks ``images``, else ``tiles``.
        size: output side (None: the stored tile size).
        embeddings: name under ``embeddings/`` (``genpath embed``); items become
            ``(tile uint8 (3,S,S), embedding float32 (D,))``.
    """

    def __init__(self, path: str | Path, array: str | None = None, size: int | None = None,
                 embeddings: str | None = None) -> None:
        import zarr

        if not Path(path).is_dir():
            raise FileNotFoundError(f"data.zarr: expected a zarr folder of tiles, got {path} (missing)")
        try:
            group = zarr.open_group(str(path), mode="r")
            array = array or ("images" if "images" in group else "tiles")
            shape = group[array].shape
        except (KeyError, OSError, ValueError) as error:
            raise ValueError(f"data.zarr: expected a zarr group with an array '{array or 'images'}', got {path} "
                             f"({type(error).__name__})") from None
        self.path, self.array, self.embeddings = str(path), array, embeddings
        nchw = len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3]
        if not (nchw or (len(shape) == 4 and shape[3] == 3 and shape[1] == shape[2])):
            raise ValueError(f"data.zarr: expected an (N,3,S,S) or (N,S,S,3) array '{array}', got shape {shape} "
                             f"in {path}")
        self.channels_last = not nchw
        self.tile = int(shape[2])
        self.size = int(size) if size is not None else self.tile
        if self.size > self.tile:
            raise ValueError(f"data.size: expected at most the tile size {self.tile} of {path}, got {self.size}")
        self.length = min(int(shape[0]), int(group.attrs.get("n_tiles", shape[0])))
        if embeddings is not None:
            stored = group["embeddings"] if "embeddings" in group else {}
            if embeddings not in stored:
                raise ValueError(f"data.embeddings: expected embeddings/{embeddings} in {path} (genpath embed), "
                                 "got none")
            found = stored[embeddings]
            done = min(int(found.attrs.get("done", found.shape[0])), found.shape[0])
            if done < self.length:
                raise ValueError(f"data.embeddings: expected {self.length} rows in embeddings/{embeddings} of {path}, "
                                 f"got {done} (finish it with genpath embed)")
        self._z = None
        self._e = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        item = item + self.length if item < 0 else item
        if not 0 <= item < self.length:
            raise IndexError(f"item: expected 0..{self.length - 1}, got {item}")
        if self._z is None:
            import zarr

            group = zarr.open_group(self.path, mode="r")
            self._z = group[self.array]
            self._e = group["embeddings"][self.embeddings] if self.embeddings else None
        tile = torch.from_numpy(self._z[item])
        if self.channels_last:
            tile = tile.permute(2, 0, 1)
        if self.size != self.tile:
            y = x = (self.tile - self.size) // 2
            tile = tile[:, y : y + self.size, x : x + self.size]
        tile = tile.contiguous()
        if self._e is None:
            return tile
        return tile, torch.from_numpy(np.asarray(self._e[item], np.float32))


def write_tile_zarr(tiles: torch.Tensor, path: str | Path, array: str = "tiles") -> Path:
    """Store uint8 tiles ``(N,3,S,S)`` as a zarr array chunked by tile."""
    import zarr

    if tiles.dtype != torch.uint8 or tiles.ndim != 4:
        raise ValueError(f"tiles: expected uint8 (N,3,S,S), got {tiles.dtype} {tuple(tiles.shape)}")
    group = zarr.open_group(str(path), mode="w")
    arr = group.create_array(array, shape=tuple(tiles.shape), chunks=(1, *tiles.shape[1:]), dtype="uint8")
    arr[:] = tiles.numpy()
    return Path(path)


class PairedTileDataset(Dataset):
    """Registered image pairs listed in a CSV (e.g. two scanners of the same tissue), cropped alike.

    Each item is ``(source, target, reference)`` uint8 ``(3,S,S)`` crops: the same window of a
    source image and of its registered target, plus a crop of *another* target image of the same
    group (slide), which serves as the style reference. Split by ``groups``, never by tile.

    Args:
        csv_path: CSV with one row per pair.
        size: crop side.
        source_column: column with the source image path (relative to the CSV's folder).
        target_column: column with the target image path.
        group_column: column naming the slide (or patient) of a pair.
        groups: keep only these groups (None: all).
        crops_per_pair: items per pair per epoch.
        seed: base seed of the crop positions.
    """

    def __init__(
        self,
        csv_path: str | Path,
        size: int,
        source_column: str = "aperio",
        target_column: str = "hamamatsu",
        group_column: str = "slide",
        groups: Sequence[str] | None = None,
        crops_per_pair: int = 4,
        seed: int = 0,
    ) -> None:
        import csv

        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"csv_path: expected a CSV listing image pairs, got {csv_path} (missing)")
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for column in (source_column, target_column, group_column):
            if rows and column not in rows[0]:
                raise ValueError(f"csv_path: expected a '{column}' column, got {sorted(rows[0])}")
        if groups is not None:
            rows = [r for r in rows if r[group_column] in set(groups)]
        if not rows:
            raise ValueError(f"groups: expected at least one pair in {csv_path} for {groups}, got none")
        base = csv_path.parent
        self.pairs = [(base / r[source_column], base / r[target_column], r[group_column]) for r in rows]
        self.by_group: dict[str, list[int]] = {}
        for i, (_, _, group) in enumerate(self.pairs):
            self.by_group.setdefault(group, []).append(i)
        self.size, self.crops, self.seed = int(size), int(crops_per_pair), int(seed)
        self._cache: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs) * self.crops

    def _read(self, path: Path) -> torch.Tensor:
        if path not in self._cache:
            self._cache[path] = read_image(path)
        return self._cache[path]

    def _crop(self, image: torch.Tensor, g: torch.Generator) -> tuple[int, int]:
        _, h, w = image.shape
        if min(h, w) < self.size:
            raise ValueError(f"size: expected images at least {self.size}px, got {w}x{h}")
        return (int(torch.randint(0, h - self.size + 1, (1,), generator=g)),
                int(torch.randint(0, w - self.size + 1, (1,), generator=g)))

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = item // self.crops
        src_path, tgt_path, group = self.pairs[i]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        source, target = self._read(src_path), self._read(tgt_path)
        y, x = self._crop(source, g)
        s = self.size
        others = [j for j in self.by_group[group] if j != i] or [i]
        ref_image = self._read(self.pairs[others[int(torch.randint(0, len(others), (1,), generator=g))]][1])
        ry, rx = self._crop(ref_image, g)
        return (source[:, y : y + s, x : x + s].contiguous(), target[:, y : y + s, x : x + s].contiguous(),
                ref_image[:, ry : ry + s, rx : rx + s].contiguous())
