"""Run configurations: YAML files in ``configs/`` loaded into validated dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclass
class NormalizeConfig:
    """Settings of ``genpath normalize``.

    Attributes:
        method: ``macenko``, ``reinhard`` or ``vahadane``.
        target: image file(s) to fit the target on (ignored when ``state`` is given).
        state: a fitted normalizer saved with ``StainNormalizer.save`` or ``--save-state``.
        batch_size: tiles of the same size normalized together.
        output_format: ``png`` (lossless), ``jpg`` or ``tif``; ``same`` keeps each input's.
        device: torch device.
        options: extra keyword arguments for the normalizer (e.g. ``alpha``, ``on_invalid``).
    """

    method: str = "macenko"
    target: list[str] = field(default_factory=list)
    state: str | None = None
    batch_size: int = 32
    output_format: str = "png"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from normalization import available_methods

        if self.method not in available_methods():
            raise ValueError(f"method: expected one of {available_methods()}, got {self.method!r}")
        if isinstance(self.target, str):
            self.target = [self.target]
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")
        if self.output_format not in ("png", "jpg", "tif", "same"):
            raise ValueError(f"output_format: expected png, jpg, tif or same, got {self.output_format!r}")


def load_config(path: str | Path, cls: type[T], section: str | None = None) -> T:
    """Load a YAML file (optionally one top-level ``section``) into dataclass ``cls``, rejecting unknown keys."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if section is not None:
        data = data.get(section, {})
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping in {path}, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown} in {path}; expected some of {sorted(known)}")
    return cls(**data)
