"""Run configs of ``genpath train``: YAML sections loaded into validated dataclasses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from genpath.training.loop import LoopSettings


@dataclass
class DataSettings:
    """Where tiles come from: image folders/files (``roots``) or a zarr array of tiles (``zarr``).

    ``zarr`` is a ``genpath tiles`` dataset (``images``) or a :func:`~genpath.training.data.write_tile_zarr`
    group (``tiles``); tiles larger than ``size`` are center-cropped. ``embeddings`` names precomputed
    embeddings of that dataset (``genpath embed``): items are then ``(tile, embedding)`` pairs.

    ``holdout`` keeps a stable, name-hashed share of files out of training (for evaluation).
    ``masks`` lists image + nuclei-mask sources for mask-conditioned training
    (:mod:`genpath.training.mask_data`), rescaled by ``mask_scale``, without the stems in ``exclude``.
    ``pairs`` names registered H&E/IHC pairs for translators (:mod:`genpath.translation.data`):
    ``root``, ``layout`` (bci, mist, csv), ``split``, ``patient_pattern``, ``scale``, ``exclude``.
    """

    roots: list[str] = field(default_factory=list)
    zarr: str | None = None
    embeddings: str | None = None
    size: int = 96
    crops_per_image: int = 8
    holdout: float = 0.0
    masks: list[dict[str, Any]] = field(default_factory=list)
    mask_scale: float = 1.0
    exclude: list[str] = field(default_factory=list)
    pairs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings is not None and not self.zarr:
            raise ValueError(f"data.embeddings: expected 'zarr' (the dataset holding them) too, got embeddings "
                             f"{self.embeddings!r} without zarr")
        if not self.roots and not self.zarr and not self.masks and not self.pairs:
            raise ValueError("data: expected 'roots' (image folders), 'zarr' (a tile array), 'masks' or 'pairs', "
                             "got none")
        if self.pairs and "root" not in self.pairs:
            raise ValueError(f"data.pairs: expected a 'root' folder, got keys {sorted(self.pairs)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"data.holdout: expected a share in [0, 1), got {self.holdout}")
        if self.crops_per_image < 1 or not (self.mask_scale > 0 and math.isfinite(self.mask_scale)):
            raise ValueError(f"data.crops_per_image / data.mask_scale: expected >= 1 / a finite value > 0, got "
                             f"{self.crops_per_image} / {self.mask_scale}")
        if self.size < 16 or self.size % 8:
            raise ValueError(f"data.size: expected a multiple of 8, at least 16, got {self.size}")

    def dataset(self, seed: int = 0):  # noqa: ANN201 - a torch Dataset
        from genpath.training.data import TileFolderDataset, ZarrTileDataset

        if self.pairs:
            from genpath.translation.data import PairedCropDataset, pairs_from_layout

            spec = dict(self.pairs)
            pairs = pairs_from_layout(spec.pop("root"), spec.pop("layout", "bci"), spec.pop("split", "train"),
                                      spec.pop("patient_pattern", r"^(.*)$"))
            excluded = set(spec.pop("exclude", []))
            pairs = [p for p in pairs if p.name not in excluded and p.patient not in excluded]
            unknown = sorted(set(spec) - {"scale"})
            if unknown:
                raise ValueError(f"data.pairs: unknown keys {unknown}; expected root, layout, split, "
                                 "patient_pattern, scale, exclude")
            return PairedCropDataset(pairs, self.size, self.crops_per_image, seed, float(spec.get("scale", 1.0)))
        if self.masks:
            from genpath.training.mask_data import MaskTileDataset

            return MaskTileDataset(self.masks, self.size, self.mask_scale, self.crops_per_image, seed, self.exclude)
        if self.zarr:
            return ZarrTileDataset(self.zarr, size=self.size, embeddings=self.embeddings)
        return TileFolderDataset(self.roots, self.size, self.crops_per_image, seed, holdout=self.holdout)


@dataclass
class TrainConfig:
    """One ``genpath train`` run: ``data``, ``train`` (loop settings) and ``model`` (architecture kwargs).

    Attributes:
        data: tile source.
        train: loop settings (steps, batch, learning rate, checkpoints, output folder).
        model: keyword arguments of the model's own config (``register_to_config``).
        options: trainer-specific settings (e.g. ``temperature`` for SimCLR, ``kl_weight`` for the VAE).
    """

    data: DataSettings
    train: LoopSettings = field(default_factory=LoopSettings)
    model: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        unknown = sorted(set(raw) - {"data", "train", "model", "options"})
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected data, train, model, options")
        from genpath.config import check_types

        blocks = {}
        for name, settings in (("data", DataSettings), ("train", LoopSettings)):
            if not isinstance(raw.get(name) or {}, dict):
                raise ValueError(f"{name}: expected a mapping, got {type(raw[name]).__name__}")
            blocks[name] = check_types(settings, raw.get(name) or {}, name)
        try:
            data = DataSettings(**blocks["data"])
            train = LoopSettings(**blocks["train"])
        except TypeError as error:
            raise ValueError(f"config: {error}") from error
        return cls(data, train, dict(raw.get("model", {})), dict(raw.get("options", {})))


def load_train_config(path: str, section: str) -> TrainConfig:
    """Load section ``section`` (``encoder``, ``vae``, ...) of a YAML file into a :class:`TrainConfig`.

    ``options`` are checked against the trainer's typed options (:mod:`genpath.training.options`)
    and completed with its defaults.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: bad YAML, a missing section, unknown keys, wrong types (one line each).
    """
    from genpath.config import read_yaml
    from genpath.training.options import TRAINERS, check_model_block, resolve_options

    raw = read_yaml(path) or {}
    if not isinstance(raw, dict) or section not in raw:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"config: expected a top-level '{section}' section in {path}, got {found}")
    block = raw[section] or {}
    if not isinstance(block, dict):
        raise ValueError(f"config: expected a mapping under '{section}' in {path}, got {type(block).__name__}")
    config = TrainConfig.from_dict(block)
    if section in TRAINERS:
        config.options = resolve_options(section, config.options)
        check_model_block(section, config.model, config.options)
    return config
