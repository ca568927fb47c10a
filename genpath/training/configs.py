"""Run configs of ``genpath train``: YAML sections loaded into validated dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from genpath.training.loop import LoopSettings


@dataclass
class DataSettings:
    """Where tiles come from: image folders/files (``roots``) or a zarr array of tiles (``zarr``).

    ``holdout`` keeps a stable, name-hashed share of files out of training (for evaluation).
    ``masks`` lists image + nuclei-mask sources for mask-conditioned training
    (:mod:`genpath.training.mask_data`), rescaled by ``mask_scale``, without the stems in ``exclude``.
    ``pairs`` names registered H&E/IHC pairs for translators (:mod:`genpath.translation.data`):
    ``root``, ``layout`` (bci, mist, csv), ``split``, ``patient_pattern``, ``scale``, ``exclude``.
    """

    roots: list[str] = field(default_factory=list)
    zarr: str | None = None
    size: int = 96
    crops_per_image: int = 8
    holdout: float = 0.0
    masks: list[dict[str, Any]] = field(default_factory=list)
    mask_scale: float = 1.0
    exclude: list[str] = field(default_factory=list)
    pairs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.roots and not self.zarr and not self.masks and not self.pairs:
            raise ValueError("data: expected 'roots' (image folders), 'zarr' (a tile array), 'masks' or 'pairs', "
                             "got none")
        if self.pairs and "root" not in self.pairs:
            raise ValueError(f"data.pairs: expected a 'root' folder, got keys {sorted(self.pairs)}")
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
            return ZarrTileDataset(self.zarr)
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
        try:
            data = DataSettings(**raw.get("data", {}))
            train = LoopSettings(**raw.get("train", {}))
        except TypeError as error:
            raise ValueError(f"config: {error}") from error
        return cls(data, train, dict(raw.get("model", {})), dict(raw.get("options", {})))


def load_train_config(path: str, section: str) -> TrainConfig:
    """Load section ``section`` (``encoder``, ``vae``, ...) of a YAML file."""
    from pathlib import Path

    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if section not in raw:
        raise ValueError(f"config: expected a top-level '{section}' section in {path}, got {sorted(raw)}")
    return TrainConfig.from_dict(raw[section])
