"""Datasets on disk: genpath synth's output as a torch ``Dataset``, and where the shared research data lives.

* :class:`SyntheticDataset`: ``SyntheticDataset("out/synth")`` feeds a ``DataLoader`` directly
  (images, masks of ``--masks`` runs, condition, seed).
* :func:`shared_data_root`: the optional shared research data (tests and benchmarks only). One
  setting: the environment variable ``GENPATH_SHARED_DATA``; by default ``../shared/data``
  beside the project root. Users who clone the project usually do not have it; code that reads
  it must skip cleanly when it returns None.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticDataset", "shared_data_root"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_data_root() -> Path | None:
    """Return the shared data folder if it exists, else None."""
    root = Path(os.environ.get("GENPATH_SHARED_DATA", DEFAULT_SHARED_DATA))
    return root if root.is_dir() else None


# ----------------------------------------------------------------------------- synthetic datasets
#: run.json ``created_by`` of a genpath synth run folder
_SYNTH_CREATOR = "genpath synth"
_ZARR_ENTRY = re.compile(r"^(?P<store>[^/]+\.zarr)/(?P<array>\w+)\[(?P<index>\d+)\]$")


class SyntheticDataset(Dataset):
    """A torch ``Dataset`` over the output folder of ``genpath synth`` (zarr or PNG, with or without masks).

    One item per generated sample (the manifest's ``done`` rows, in id order; failed inputs are
    listed in :attr:`failed`). Each item is a dict:

    * ``image``: uint8 ``(3,H,W)`` (after ``transform``, when given);
    * ``id`` and ``seed``: the sample's id and its generator seed (``int``);
    * ``condition``: index of the condition (reference image or embedding row; ``--masks``: the mask);
    * ``reference``: its name (the reference image path, ``file.npy[i]``, or the mask's name);
    * ``embedding``: float32 ``(D,)`` (or ``(T,D)``) conditioning row, when the run saved its
      embeddings (``genpath synth``, not ``--masks``);
    * ``instances`` and ``types``: int64 ``(H,W)`` label maps (``--masks`` runs);
    * ``style``: the style image of a ``--masks`` run ("" without one).

    Every item has the same keys, so a ``DataLoader`` with the default collate batches them.

    Args:
        out_dir: a folder written by ``genpath synth`` (``run.json``, ``manifest.csv`` and
            ``images.zarr``/``pairs.zarr`` or ``images/`` [+ ``masks/``]).
        transform: called on each ``image`` tensor.

    Raises:
        FileNotFoundError / ValueError: one line naming ``out_dir`` when it is not a finished synth
            output folder.

    Example:
        >>> ds = SyntheticDataset("out/synth")  # doctest: +SKIP
        >>> batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))  # doctest: +SKIP
    """

    def __init__(self, out_dir: str | Path, transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.root = Path(out_dir)
        self.transform = transform
        expected = "out_dir: expected a genpath synth output folder (run.json, manifest.csv and the samples)"
        if not self.root.is_dir():
            what = "missing" if not self.root.exists() else "a file"
            raise FileNotFoundError(f"{expected}, got {self.root} ({what})")
        self.settings = _synth_settings(self.root / "run.json", expected)
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            raise FileNotFoundError(f"{expected}, got {self.root} (no manifest.csv)")
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = reader.fieldnames or []
        if "id" not in fields or "file" not in fields:
            raise ValueError(f"{expected}, got a manifest.csv without id/file columns in {self.root}")
        self.failed = [r for r in rows if r.get("status") == "failed"]
        self.rows = sorted((r for r in rows if r.get("status", "done") in ("done", "") and r.get("id")),
                           key=lambda r: int(r["id"]))
        if not self.rows:
            raise ValueError(f"{expected}, got no finished samples in {manifest}")
        self.masks = "mask_file" in fields
        self._group: Any = None
        self._store = _ZARR_ENTRY.match(self.rows[0]["file"])
        missing = self.root / (self._store.group("store") if self._store else self.rows[0]["file"])
        if not missing.exists():
            raise FileNotFoundError(f"{expected}, got {self.root} without {missing.name} (named by manifest.csv)")
        self.embeddings = self._read_embeddings()

    def _read_embeddings(self) -> np.ndarray | None:
        if self.masks:
            return None
        path = self.root / "embeddings.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False, mmap_mode="r")
        return None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open the zarr store themselves
        return {**self.__dict__, "_group": None}

    def __len__(self) -> int:
        return len(self.rows)

    def _zarr(self, entry: str) -> np.ndarray:
        import zarr

        match = _ZARR_ENTRY.match(entry)
        if match is None:
            raise ValueError(f"out_dir: expected a zarr entry like images.zarr/images[0] in {self.root}, got {entry!r}")
        if self._group is None:
            self._group = zarr.open_group(str(self.root / match.group("store")), mode="r")
        return np.asarray(self._group[match.group("array")][int(match.group("index"))])

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        if _ZARR_ENTRY.match(row["file"]):
            image = torch.from_numpy(self._zarr(row["file"]).copy())
        else:
            from genpath.io.images import read_image

            image = read_image(self.root / row["file"])
        sample_id = int(row["id"])
        item: dict[str, Any] = {"image": self.transform(image) if self.transform else image, "id": sample_id,
                                "seed": int(row["seed"])}
        if self.masks:
            item.update(condition=int(row.get("mask") or 0), reference=row.get("mask_source", ""),
                        style=row.get("style", ""))
            item.update(self._mask(row["mask_file"]))
        else:
            condition = int(row.get("condition") or 0)
            item.update(condition=condition, reference=row.get("source", ""))
            if self.embeddings is not None:
                item["embedding"] = torch.from_numpy(np.array(self.embeddings[condition], dtype=np.float32))
        return item

    def _mask(self, entry: str) -> dict[str, torch.Tensor]:
        match = _ZARR_ENTRY.match(entry)
        if match:
            index = match.group("index")
            instances = self._zarr(f"{match.group('store')}/instances[{index}]")
            types = self._zarr(f"{match.group('store')}/types[{index}]")
        else:
            with np.load(self.root / entry, allow_pickle=False) as data:
                instances, types = data["instances"], data["types"]
        return {"instances": torch.from_numpy(instances.astype(np.int64)),
                "types": torch.from_numpy(types.astype(np.int64))}


def _synth_settings(record: Path, expected: str) -> dict[str, Any]:
    """Return the settings a synth run recorded in ``run.json``; a one-line error when it is not one."""
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{expected}, got {record.parent} (no run.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{expected}, got an unreadable {record} ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get("created_by") != _SYNTH_CREATOR or not isinstance(data.get("settings"),
                                                                                                 dict):
        raise ValueError(f"{expected}, got {record} not written by genpath synth")
    return data["settings"]
