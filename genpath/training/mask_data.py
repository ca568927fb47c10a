"""Image + nuclei-mask crops for mask-conditioned training (ControlNet).

Sources are listed as dicts of three kinds:

* one image with its maps: ``{"image": ..., "instances": ..., "types": ...}`` (``.npz`` maps read
  key ``key``, default ``nuc_raster``; other files are 16-bit label images);
* two folders matched by file stem: ``{"images": DIR, "instances": DIR}`` (e.g. MoNuSeg);
* H&E without masks: ``{"generated": FILE | DIR}`` (folders searched recursively): nuclei are
  segmented at load time, after rescaling, by the classical
  :func:`genpath.metrics.nuclei.segment_nuclei` (haematoxylin deconvolution, Otsu, distance-transform
  watershed; its ``min_area``, ``sigma``, ``min_distance`` and ``contrast`` can be given), with
  empty type maps (nucleus type unknown). ``holdout`` drops the files whose name falls in that
  hashed share (:func:`genpath.training.data.in_holdout`, e.g. PCam's 0.3 evaluation share) and
  ``limit`` keeps at most that many files, evenly spaced in name order.

Every source may also give ``region`` ([x0, x1]: crops stay inside that horizontal band, as
fractions of the width, so that the rest of an image can be held out), ``scale`` (overrides the
dataset's ``scale`` for that source) and ``crops`` (crops per image per epoch for that source,
overriding ``crops_per_image``: weights small tiles against large images). ``exclude`` names stems
kept out (held-out evaluation images). Images and masks are rescaled together by ``scale`` (area
for the image, nearest for the maps) so that a 40× source can match a model trained at another
resolution.
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


SEGMENTER_KEYS = ("min_area", "sigma", "min_distance", "contrast")
_COMMON_KEYS = {"region", "scale", "crops", "key"}
_KINDS = {"image": {"image", "instances", "types"}, "images": {"images", "instances"},
          "generated": {"generated", "holdout", "limit", *SEGMENTER_KEYS}}


def _number(spec: dict[str, Any], key: str, i: int, low: float, high: float, integer: bool = False) -> Any:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) \
            or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"masks[{i}].{key}: expected {kind} in [{low}, {high}], got {value!r}")
    return value


def _generated_files(spec: dict[str, Any], i: int) -> list[Path]:
    from genpath.io.images import IMAGE_SUFFIXES
    from genpath.training.data import in_holdout

    root = Path(spec["generated"])
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"masks[{i}].generated: expected an H&E image or a folder of them, got {root} "
                                "(missing)")
    holdout = _number(spec, "holdout", i, 0.0, 0.99) or 0.0
    files = [p for p in files if not in_holdout(p, holdout)]
    limit = _number(spec, "limit", i, 1, 10**9, integer=True)
    if limit is not None and len(files) > limit:
        files = [files[round(k)] for k in np.linspace(0, len(files) - 1, limit)]
    return files


def expand_mask_sources(sources: Sequence[dict[str, Any]], exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Resolve source dicts into one entry per image (folders matched by stem).

    Entries hold ``image``, ``instances``, ``types``, ``key``, ``region``, ``scale``, ``crops`` and
    ``segmenter`` (``instances`` None and ``segmenter`` the segmenter's settings for generated masks).

    Raises:
        ValueError: a source of no known kind, an unknown key, or a value out of range (one line).
        FileNotFoundError: a missing image or folder.
    """
    entries: list[dict[str, Any]] = []
    for i, spec in enumerate(sources):
        if not isinstance(spec, dict):
            raise ValueError(f"masks[{i}]: expected a mapping, got {type(spec).__name__}")
        kind = next((k for k in ("generated", "images", "image") if k in spec), None)
        if kind is None or (kind != "generated" and "instances" not in spec):
            raise ValueError(f"masks[{i}]: expected keys image+instances(+types), images+instances or generated, "
                             f"got {sorted(spec)}")
        unknown = sorted(set(spec) - _KINDS[kind] - _COMMON_KEYS)
        if unknown:
            raise ValueError(f"masks[{i}]: unknown keys {unknown} for a '{kind}' source; expected some of "
                             f"{sorted(_KINDS[kind] | _COMMON_KEYS)}")
        common = {"key": spec.get("key", "nuc_raster"), "region": _region(spec, i),
                  "scale": _number(spec, "scale", i, 1e-3, 4.0), "crops": _number(spec, "crops", i, 1, 10**6, True),
                  "segmenter": None}
        if kind == "generated":
            segmenter = {k: spec[k] for k in SEGMENTER_KEYS if k in spec}
            for key in SEGMENTER_KEYS:
                _number(spec, key, i, 0 if key != "min_distance" else 1, 10**4, key in ("min_area", "min_distance"))
            entries.extend({**common, "image": p, "instances": None, "types": None, "segmenter": segmenter}
                           for p in _generated_files(spec, i))
        elif kind == "images":
            images, masks = Path(spec["images"]), Path(spec["instances"])
            if not images.is_dir() or not masks.is_dir():
                raise FileNotFoundError(f"masks[{i}]: expected image and mask folders, got {images}, {masks}")
            by_stem = {p.stem: p for p in masks.iterdir() if p.is_file()}
            for image in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                if image.stem in by_stem:
                    entries.append({**common, "image": image, "instances": by_stem[image.stem], "types": None})
        else:
            entries.append({**common, "image": Path(spec["image"]), "instances": Path(spec["instances"]),
                            "types": Path(spec["types"]) if spec.get("types") else None})
    entries = [e for e in entries if e["image"].stem not in set(exclude)]
    if not entries:
        raise ValueError("masks: expected at least one image with a mask, got none")
    return entries


class MaskTileDataset(Dataset):
    """Random crops ``(image uint8 (3,S,S), instances int64 (S,S), types int64 (S,S))`` of masked images.

    Args:
        sources: see the module doc.
        size: crop side (after rescaling).
        scale: rescale factor applied to images and maps (e.g. 0.5: 40× → 20×); a source's own
            ``scale`` overrides it.
        crops_per_image: items per image per epoch (a source's own ``crops`` overrides it).
        seed: base seed of crop positions.
        exclude: image stems left out.
    """

    def __init__(self, sources: Sequence[dict[str, Any]], size: int, scale: float = 1.0, crops_per_image: int = 64,
                 seed: int = 0, exclude: Sequence[str] = ()) -> None:
        if not 0.0 < scale <= 4.0:
            raise ValueError(f"scale: expected a factor in (0, 4], got {scale}")
        self.entries = expand_mask_sources(sources, exclude)
        self.size, self.scale, self.crops, self.seed = int(size), float(scale), int(crops_per_image), int(seed)
        counts = [e["crops"] or self.crops for e in self.entries]
        self._offsets = np.cumsum([0, *counts])
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def entry_of(self, item: int) -> int:
        """Index of the entry (image) that item ``item`` crops."""
        if not 0 <= item < len(self):
            raise IndexError(f"item: expected an index in [0, {len(self)}), got {item}")
        return int(np.searchsorted(self._offsets, item, side="right")) - 1

    def first_item(self, i: int) -> int:
        """Return the first item cropped from entry ``i``."""
        return int(self._offsets[i])

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the rescaled image, instance map and type map (zeros when absent) of entry ``i``.

        Generated masks are segmented here, on the rescaled image, with empty types.
        """
        if i not in self._cache:
            entry = self.entries[i]
            image = read_image(entry["image"])
            scale = entry["scale"] or self.scale
            if entry["segmenter"] is not None:
                image = _rescale(image, scale, "area")
                from genpath.metrics.nuclei import segment_nuclei

                inst = torch.from_numpy(segment_nuclei(image.permute(1, 2, 0).numpy(), **entry["segmenter"])).long()
                types = torch.zeros_like(inst)
            else:
                inst = read_label_map(entry["instances"], entry["key"])
                types = read_label_map(entry["types"], entry["key"]) if entry["types"] else torch.zeros_like(inst)
                if inst.shape != image.shape[-2:] or types.shape != inst.shape:
                    raise ValueError(f"masks: expected maps of the image's size {tuple(image.shape[-2:])} for "
                                     f"{entry['image']}, got {tuple(inst.shape)} / {tuple(types.shape)}")
                image = _rescale(image, scale, "area")
                inst, types = (_rescale(m, scale, "nearest-exact") for m in (inst, types))
            if min(image.shape[-2:]) < self.size:
                raise ValueError(f"size: expected images of at least {self.size}px after scaling, "
                                 f"got {tuple(image.shape[-2:])} for {entry['image']}")
            self._cache[i] = (image, inst, types)
        return self._cache[i]

    def crop_box(self, item: int) -> tuple[int, int]:
        """Top-left ``(y, x)`` of item ``item``'s crop (deterministic given the seed, inside the region)."""
        i = self.entry_of(item)
        image, _, _ = self.load(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        h, w = image.shape[-2:]
        low, high = self.entries[i]["region"]
        x0, x1 = round(low * w), max(round(low * w), round(high * w) - self.size)
        y = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        x = int(torch.randint(x0, min(x1, w - self.size) + 1, (1,), generator=g))
        return y, x

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, inst, types = self.load(self.entry_of(item))
        y, x = self.crop_box(item)
        s = self.size
        return (image[:, y : y + s, x : x + s].contiguous(), inst[y : y + s, x : x + s].contiguous(),
                types[y : y + s, x : x + s].contiguous())


def _rescale(x: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """Rescale an image ``(3,H,W)`` uint8 (``area``) or a label map ``(H,W)`` int64 (``nearest-exact``)."""
    if scale == 1.0:
        return x
    h, w = (round(s * scale) for s in x.shape[-2:])
    if x.ndim == 3:
        mode = mode if scale < 1 else "bilinear"
        return F.interpolate(x[None].float(), (h, w), mode=mode)[0].round().clamp(0, 255).to(torch.uint8)
    return F.interpolate(x[None, None].float(), (h, w), mode=mode)[0, 0].long()
