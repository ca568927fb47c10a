"""Image + nuclei-mask crops for mask-conditioned training (ControlNet).

Sources are listed as dicts, either one image with its maps
(``{"image": ..., "instances": ..., "types": ..., "region": [x0, x1]}``, where the optional
``region`` keeps crops inside that horizontal band, as fractions of the width, so that the rest
of an image can be held out; ``.npz`` maps read key ``key``, default
``nuc_raster``, other files are 16-bit label images) or two folders matched by file stem
(``{"images": DIR, "instances": DIR}``, e.g. MoNuSeg). ``exclude`` names stems kept out (held-out
evaluation images). Images and masks are rescaled together by ``scale`` (area for the image,
nearest for the maps) so that a 40× source can match a model trained at another resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genpath.io.images import IMAGE_SUFFIXES, read_image


def read_label_map(path: str | Path, key: str = "nuc_raster") -> torch.Tensor:
    """Read an integer label map ``(H,W)`` from ``.npz`` (array ``key``) or a label image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks: expected a label map file, got {path} (missing)")
    if path.suffix == ".npz":
        with np.load(path) as data:
            if key not in data.files:
                raise ValueError(f"masks: expected array '{key}' in {path}, got {data.files}")
            array = data[key]
    else:
        from PIL import Image

        array = np.asarray(Image.open(path))
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"masks: expected a 2-D integer label map in {path}, got {array.dtype} {array.shape}")
    return torch.from_numpy(array.astype(np.int64))


def _region(spec: dict[str, Any], i: int) -> tuple[float, float]:
    low, high = (float(v) for v in spec.get("region", (0.0, 1.0)))
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"masks[{i}].region: expected [x0, x1] fractions of the width with 0 <= x0 < x1 <= 1, "
                         f"got {spec.get('region')}")
    return low, high


def expand_mask_sources(sources: Sequence[dict[str, Any]], exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Resolve source dicts into ``{"image", "instances", "types", "key"}`` entries (folders matched by stem)."""
    entries: list[dict[str, Any]] = []
    for i, spec in enumerate(sources):
        if "images" in spec:
            images, masks = Path(spec["images"]), Path(spec["instances"])
            if not images.is_dir() or not masks.is_dir():
                raise FileNotFoundError(f"masks[{i}]: expected image and mask folders, got {images}, {masks}")
            by_stem = {p.stem: p for p in masks.iterdir() if p.is_file()}
            for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                if image.stem in by_stem:
                    entries.append({"image": image, "instances": by_stem[image.stem], "types": None,
                                    "key": spec.get("key", "nuc_raster"), "region": _region(spec, i)})
        elif "image" in spec and "instances" in spec:
            entries.append({"image": Path(spec["image"]), "instances": Path(spec["instances"]),
                            "types": Path(spec["types"]) if spec.get("types") else None,
                            "key": spec.get("key", "nuc_raster"), "region": _region(spec, i)})
        else:
            raise ValueError(
                f"masks[{i}]: expected keys image+instances(+types) or images+instances, got {sorted(spec)}"
            )
    entries = [e for e in entries if e["image"].stem not in set(exclude)]
    if not entries:
        raise ValueError("masks: expected at least one image with a mask, got none")
    return entries


class MaskTileDataset(Dataset):
    """Random crops ``(image uint8 (3,S,S), instances int64 (S,S), types int64 (S,S))`` of masked images.

    Args:
        sources: see the module doc.
        size: crop side (after rescaling).
        scale: rescale factor applied to images and maps (e.g. 0.5: 40× → 20×).
        crops_per_image: items per image per epoch.
        seed: base seed of crop positions.
        exclude: image stems left out.
    """

    def __init__(self, sources: Sequence[dict[str, Any]], size: int, scale: float = 1.0, crops_per_image: int = 64,
                 seed: int = 0, exclude: Sequence[str] = ()) -> None:
        if not 0.0 < scale <= 4.0:
            raise ValueError(f"scale: expected a factor in (0, 4], got {scale}")
        self.entries = expand_mask_sources(sources, exclude)
        self.size, self.scale, self.crops, self.seed = int(size), float(scale), int(crops_per_image), int(seed)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries) * self.crops

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the rescaled image, instance map and type map (zeros when absent) of entry ``i``."""
        if i not in self._cache:
            entry = self.entries[i]
            image = read_image(entry["image"])
            inst = read_label_map(entry["instances"], entry["key"])
            types = read_label_map(entry["types"], entry["key"]) if entry["types"] else torch.zeros_like(inst)
            if inst.shape != image.shape[-2:] or types.shape != inst.shape:
                raise ValueError(f"masks: expected maps of the image's size {tuple(image.shape[-2:])} for "
                                 f"{entry['image']}, got {tuple(inst.shape)} / {tuple(types.shape)}")
            if self.scale != 1.0:
                h, w = (round(s * self.scale) for s in image.shape[-2:])
                image = F.interpolate(image[None].float(), (h, w), mode="area")[0].round().to(torch.uint8)
                inst = F.interpolate(inst[None, None].float(), (h, w), mode="nearest-exact")[0, 0].long()
                types = F.interpolate(types[None, None].float(), (h, w), mode="nearest-exact")[0, 0].long()
            if min(image.shape[-2:]) < self.size:
                raise ValueError(f"size: expected images of at least {self.size}px after scaling, "
                                 f"got {tuple(image.shape[-2:])} for {entry['image']}")
            self._cache[i] = (image, inst, types)
        return self._cache[i]

    def crop_box(self, item: int) -> tuple[int, int]:
        """Top-left ``(y, x)`` of item ``item``'s crop (deterministic given the seed, inside the region)."""
        image, _, _ = self.load(item // self.crops)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        h, w = image.shape[-2:]
        low, high = self.entries[item // self.crops]["region"]
        x0, x1 = round(low * w), max(round(low * w), round(high * w) - self.size)
        y = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        x = int(torch.randint(x0, min(x1, w - self.size) + 1, (1,), generator=g))
        return y, x

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, inst, types = self.load(item // self.crops)
        y, x = self.crop_box(item)
        s = self.size
        return (image[:, y : y + s, x : x + s].contiguous(), inst[y : y + s, x : x + s].contiguous(),
                types[y : y + s, x : x + s].contiguous())
