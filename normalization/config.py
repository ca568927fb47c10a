"""``NormalizeConfig``: the settings of a normalization run, and the one "saved state or fit on the target" helper."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from genpath.config import check_types
from genpath.io.images import expand_inputs, read_image
from genpath.wsi import SlideOptions
from normalization.base import StainNormalizer, available_methods, build_normalizer


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
        slide: slide settings (see :class:`genpath.wsi.SlideOptions`: ``tile_size``,
            ``overlap``, ``level``, ``compression``, ``quality``, ``min_tissue``, ``source``, ...;
            see :class:`genpath.wsi.SlideOptions`).
        mpp: microns per pixel for slides without metadata (a CSV's ``mpp`` column wins).
        executor: ``local`` or ``dask``.
        scheduler: dask scheduler address (``tcp://host:8786``); None starts a local cluster.
        workers: slides processed in parallel (processes).
        resume: skip slides already done with the same config hash.
        skip_errors: record a failed slide in the manifest and go on.
    """

    method: str = "macenko"
    target: list[str] | str = field(default_factory=list)
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
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise ValueError(f"mpp: expected positive microns per pixel, got {self.mpp}")
        if self.output_format in ("tiff", "ome-zarr"):
            self.slide_options()  # validates the slide block early

    @property
    def slide_mode(self) -> bool:
        return self.output_format in ("tiff", "ome-zarr")

    def slide_options(self) -> SlideOptions:
        """Return the slide block as validated :class:`genpath.wsi.SlideOptions`."""
        known = {f.name for f in dataclasses.fields(SlideOptions)} - {"output_format", "batch_size"}
        unknown = sorted(set(self.slide) - known)
        if unknown:
            raise ValueError(f"slide: unknown keys {unknown}; expected some of {sorted(known)}")
        slide = check_types(SlideOptions, self.slide, "slide")
        return SlideOptions(**slide, output_format=self.output_format or "tiff", batch_size=self.batch_size)

    def require_source(self) -> None:
        """Raise a one-line ``ValueError`` unless a target or a saved state is given."""
        if not (self.target or self.state):
            raise ValueError("target: expected a target image (--target FILE) or a saved state (--state FILE), "
                             "got neither")


def load_or_fit_normalizer(
    method: str,
    target: list[str] | None = None,
    state: str | None = None,
    options: dict[str, Any] | None = None,
    device: str = "cpu",
) -> StainNormalizer:
    """Load a saved normalizer (``state``), or build ``method`` and fit it on the ``target`` image(s).

    Args:
        method: normalization method (ignored when ``state`` is given: the file names its method).
        target: target image files, folders or globs.
        state: a ``.safetensors`` file written by :meth:`StainNormalizer.save`.
        options: keyword arguments of the normalizer (override the saved ones for ``state``).
        device: torch device of the returned normalizer.

    Returns:
        The fitted normalizer in eval mode on ``device``.

    Raises:
        ValueError: neither ``target`` nor ``state`` is given.
        FileNotFoundError: a target or the state file does not exist.

    Example:
        >>> load_or_fit_normalizer("macenko", target=["samples/images/he_tiatoolbox_target.png"]).fitted.item()
        True
    """
    options = dict(options or {})
    if not (state or target):
        raise ValueError("target: expected a target image (--target FILE) or a saved state (--state FILE), got neither")
    try:
        normalizer = StainNormalizer.load(state, **options) if state else build_normalizer(method, **options)
    except TypeError as error:  # an option the method does not take
        raise ValueError(f"options: expected settings of the {method!r} normalizer, got {error}") from None
    if not state:
        normalizer.fit(read_targets(target))
    return normalizer.to(device).eval()


def read_targets(target: list[str] | str) -> list:
    """Read target image files (files, folders or globs) as uint8 ``(3,H,W)`` tensors.

    Raises:
        FileNotFoundError: a target matches nothing (named ``target``).
        ValueError: a target is not a readable image (named ``target``).
    """
    try:
        files = expand_inputs([target] if isinstance(target, str) else target)
    except FileNotFoundError as error:
        raise FileNotFoundError(str(error).replace("inputs:", "target:", 1)) from None
    images = []
    for path, _ in files:
        try:
            images.append(read_image(path))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"target: {error}") from None
        except (OSError, ValueError) as error:  # read_image's one-line errors name the file and the reason
            raise ValueError(f"target: {str(error).splitlines()[0]}") from None
    return images

