"""Paired H&E/IHC data: the public folder layouts, patient-level splits, aligned random crops.

Layouts (``pairs_from_layout``):

* ``"bci"``: BCI (Liu et al., 2022): ``HE/{train,test}/NAME`` and ``IHC/{train,test}/NAME``
  with the same file names (a flat ``HE/`` + ``IHC/`` is read as well).
* ``"mist"``: MIST (Li et al., 2023): ``TrainValAB/{trainA,trainB,valA,valB}/NAME`` (A = H&E,
  B = IHC), per marker folder (``MIST/HER2/TrainValAB``); ``split="train"|"val"``.
* ``"csv"``: a ``pairs.csv`` with ``he``, ``ihc`` (paths relative to the CSV) and optional
  ``split``/``patient`` columns, as genpath's shared BCI sample.

Split by pair (or patient), never by crop: :func:`split_by_patient` hashes the patient id
taken from the file name with a regular expression, so every crop of a patient lands on one side.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from genpath.io.images import IMAGE_SUFFIXES, read_image

LAYOUTS = ("bci", "mist", "csv")


@dataclass(frozen=True)
class ImagePair:
    """One H&E image and its (roughly registered) IHC image of the adjacent section."""

    he: Path
    ihc: Path
    name: str
    patient: str


def _images(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _match(he_dir: Path, ihc_dir: Path, pattern: str) -> list[ImagePair]:
    for folder in (he_dir, ihc_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"root: expected the folder {folder}, got nothing there")
    he, ihc = _images(he_dir), _images(ihc_dir)
    missing = sorted(set(he) ^ set(ihc))
    if missing:
        raise ValueError(f"root: expected the same file names in {he_dir} and {ihc_dir}, got unmatched {missing[:5]}")
    return [ImagePair(he[n], ihc[n], n, patient_of(n, pattern)) for n in sorted(he)]


def patient_of(name: str, pattern: str = r"^(.*)$") -> str:
    """Return the patient (or slide) id of a file name: the first group of ``pattern`` (default: the name)."""
    match = re.search(pattern, name)
    if match is None:
        raise ValueError(f"pattern: expected {pattern!r} to match file name {name!r}, got no match")
    return match.group(1) if match.groups() else match.group(0)


def pairs_from_layout(root: str | Path, layout: str = "bci", split: str | None = "train",
                      patient_pattern: str = r"^(.*)$") -> list[ImagePair]:
    """List the H&E/IHC pairs of a dataset folder.

    Args:
        root: the dataset folder (see the module docstring for each layout).
        layout: ``"bci"``, ``"mist"`` or ``"csv"``.
        split: ``"train"``, ``"test"``/``"val"``, or None for every pair (csv: rows whose
            ``split`` column matches; no column means every row).
        patient_pattern: regular expression whose first group is the patient id in a file name.

    Example:
        >>> pairs = pairs_from_layout("../shared/data/he_ihc_pairs/bci_her2", "csv", "test")  # doctest: +SKIP
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if layout == "bci":
        sub = [split] if split else ["train", "test"]
        if (root / "HE" / sub[0]).is_dir():
            return [p for s in sub for p in _match(root / "HE" / s, root / "IHC" / s, patient_pattern)]
        return _match(root / "HE", root / "IHC", patient_pattern)
    if layout == "mist":
        base = root / "TrainValAB" if (root / "TrainValAB").is_dir() else root
        sub = [split] if split else ["train", "val"]
        return [p for s in sub for p in _match(base / f"{s}A", base / f"{s}B", patient_pattern)]
    table = root / "pairs.csv" if root.is_dir() else root
    if not table.is_file():
        raise FileNotFoundError(f"root: expected a pairs.csv (columns he, ihc[, split, patient]), got {table}")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"he", "ihc"} <= set(rows[0]):
        raise ValueError(f"root: expected 'he' and 'ihc' columns in {table}, got {sorted(rows[0])}")
    pairs = []
    for row in rows:
        if split and "split" in row and row["split"] != split:
            continue
        name = Path(row["he"]).name
        patient = row.get("patient") or patient_of(name, patient_pattern)
        pairs.append(ImagePair(table.parent / row["he"], table.parent / row["ihc"], name, patient))
    return pairs


def split_by_patient(pairs: list[ImagePair], holdout: float = 0.2) -> tuple[list[ImagePair], list[ImagePair]]:
    """Split pairs into (train, held out) by a stable hash of the patient id.

    Example:
        >>> ps = [ImagePair(Path("a"), Path("b"), f"{i}", f"p{i // 2}") for i in range(20)]
        >>> train, test = split_by_patient(ps, 0.3)
        >>> not {p.patient for p in train} & {p.patient for p in test}
        True
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout: expected a share in [0, 1), got {holdout}")

    def held(patient: str) -> bool:
        digest = int(hashlib.sha1(patient.encode()).hexdigest()[:8], 16)
        return digest / 0xFFFFFFFF < holdout

    return [p for p in pairs if not held(p.patient)], [p for p in pairs if held(p.patient)]


class PairedCropDataset(Dataset):
    """Aligned random crops of H&E/IHC pairs: items ``(he, ihc)`` uint8 ``(3,S,S)``.

    Crops are the same window of both images (the pairs are registered, roughly), drawn from
    ``seed`` and the item index (reproducible in any worker), with one shared dihedral flip/rotation.

    Args:
        pairs: from :func:`pairs_from_layout`.
        size: crop side in pixels.
        crops_per_pair: items per pair per epoch.
        seed: base seed of the crop positions.
        scale: resize factor applied when reading (e.g. 0.5 for a 20× model on 40× pairs).
    """

    def __init__(self, pairs: list[ImagePair], size: int, crops_per_pair: int = 16, seed: int = 0,
                 scale: float = 1.0) -> None:
        if not pairs:
            raise ValueError("pairs: expected at least one H&E/IHC pair, got none")
        if size < 8:
            raise ValueError(f"size: expected a crop side of at least 8 px, got {size}")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale: expected a factor in (0, 1], got {scale}")
        self.pairs, self.size, self.crops, self.seed, self.scale = list(pairs), int(size), int(crops_per_pair), \
            int(seed), float(scale)
        self._cache: dict[Path, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.pairs) * self.crops

    def _read(self, path: Path) -> torch.Tensor:
        if path not in self._cache:
            image = read_image(path)
            if self.scale != 1.0:
                import torch.nn.functional as F

                h, w = (round(s * self.scale) for s in image.shape[-2:])
                image = F.interpolate(image[None].float(), size=(h, w), mode="area")[0].round().to(torch.uint8)
            self._cache[path] = image
        return self._cache[path]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[item // self.crops]
        he, ihc = self._read(pair.he), self._read(pair.ihc)
        if he.shape != ihc.shape:
            raise ValueError(f"pairs: expected H&E and IHC of one size, got {tuple(he.shape)} and "
                             f"{tuple(ihc.shape)} for {pair.name}")
        _, h, w = he.shape
        s = self.size
        if min(h, w) < s:
            raise ValueError(f"size: expected images of at least {s}px, got {w}x{h} for {pair.name}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + item)
        y = int(torch.randint(0, h - s + 1, (1,), generator=g))
        x = int(torch.randint(0, w - s + 1, (1,), generator=g))
        k, flip = int(torch.randint(0, 4, (1,), generator=g)), bool(torch.randint(0, 2, (1,), generator=g))
        out = []
        for image in (he, ihc):
            crop = torch.rot90(image[:, y : y + s, x : x + s], k, (-2, -1))
            out.append((crop.flip(-1) if flip else crop).contiguous())
        return out[0], out[1]
