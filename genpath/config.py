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
        output_format: tiles: ``png`` (lossless), ``jpg`` or ``tif``, ``same`` keeps each
            input's; slides: ``tiff`` (pyramidal BigTIFF) or ``ome-zarr``; None picks ``tiff``
            for slide inputs and ``png`` for images.
        device: torch device.
        options: extra keyword arguments for the normalizer (e.g. ``alpha``, ``on_invalid``).
        slide: slide settings (see :class:`normalization.slide.SlideOptions`: ``tile_size``,
            ``overlap``, ``level``, ``compression``, ``quality``, ``min_tissue``, ``source``, ...).
        mpp: microns per pixel for slides without metadata (a CSV's ``mpp`` column wins).
        executor: ``local`` or ``dask``.
        scheduler: dask scheduler address (``tcp://host:8786``); None starts a local cluster.
        workers: slides processed in parallel (processes).
        resume: skip slides already done with the same config hash.
        skip_errors: record a failed slide in the manifest and go on.
    """

    method: str = "macenko"
    target: list[str] = field(default_factory=list)
    state: str | None = None
    batch_size: int = 32
    output_format: str | None = None
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    slide: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None
    executor: str = "local"
    scheduler: str | None = None
    workers: int = 1
    resume: bool = True
    skip_errors: bool = True

    def __post_init__(self) -> None:
        from normalization import available_methods

        if self.method not in available_methods():
            raise ValueError(f"method: expected one of {available_methods()}, got {self.method!r}")
        if isinstance(self.target, str):
            self.target = [self.target]
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {self.batch_size}")
        formats = ("png", "jpg", "tif", "same", "tiff", "ome-zarr")
        if self.output_format is not None and self.output_format not in formats:
            raise ValueError(f"output_format: expected one of {formats}, got {self.output_format!r}")
        if self.executor not in ("local", "dask"):
            raise ValueError(f"executor: expected 'local' or 'dask', got {self.executor!r}")
        if self.workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {self.workers}")
        if self.mpp is not None and not self.mpp > 0:
            raise ValueError(f"mpp: expected positive microns per pixel, got {self.mpp}")
        if self.output_format in ("tiff", "ome-zarr"):
            self.slide_options()  # validates the slide block early

    @property
    def slide_mode(self) -> bool:
        return self.output_format in ("tiff", "ome-zarr")

    def slide_options(self):  # noqa: ANN201 - SlideOptions (imported lazily)
        """Return the slide block as validated :class:`normalization.slide.SlideOptions`."""
        from normalization.slide import SlideOptions

        known = {f.name for f in dataclasses.fields(SlideOptions)} - {"output_format", "batch_size"}
        unknown = sorted(set(self.slide) - known)
        if unknown:
            raise ValueError(f"slide: unknown keys {unknown}; expected some of {sorted(known)}")
        return SlideOptions(**self.slide, output_format=self.output_format or "tiff", batch_size=self.batch_size)


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
