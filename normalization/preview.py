"""See what normalization does to a few images before running a batch: a labelled grid.

:func:`normalize_preview_grid` fits each method once on the target, normalizes every image with
it and lays the results out one image per row: the original, then one column per method. The
first row shows the target. Under each normalized cell: the method, whether the tile was
normalized or passed through (too little tissue), and the tile's own (source) stain state as
the method estimates it (99th percentile H and E concentrations, or LAB means for Reinhard).

Example:
    >>> from genpath.io.images import read_image
    >>> target = read_image("samples/images/he_tiatoolbox_target.png")[:, :128, :128]
    >>> tile = read_image("samples/images/he_hgsc_nest.jpg")[:, :128, :128]
    >>> normalize_preview_grid([tile], ["macenko", "reinhard"], target).shape[0]
    3
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from genpath.io.images import expand_inputs, read_image
from genpath.report.grid import labelled_grid
from normalization.base import available_methods, build_normalizer
from normalization.config import read_targets
from normalization.report import tile_statistics

__all__ = ["MAX_IMAGES", "normalize_preview_grid", "state_label"]
MAX_IMAGES = 64


def state_label(state: dict[str, Any] | None) -> str:
    """Describe a tile's fitted stain state (:func:`normalization.report.stain_state`) in a few words."""
    if not state:
        return ""
    if "max_concentrations" in state:
        p = f"p{state.get('percentile', 99.0):g}"
        values = zip("HE", state["max_concentrations"], strict=False)
        return " ".join(f"{name} {p} {value:.2f}" for name, value in values if value is not None)
    if "lab_mean" in state:
        return "LAB " + " ".join(f"{value:.0f}" for value in state["lab_mean"] if value is not None)
    return ""


def _images(items: Sequence[torch.Tensor | str | Path], name: str) -> list[tuple[str, torch.Tensor]]:
    named: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            named.append((f"{name}[{i}]", item))
            continue
        try:
            files = expand_inputs([item])
        except FileNotFoundError as error:
            raise FileNotFoundError(str(error).replace("inputs:", f"{name}:", 1)) from None
        for path, _ in files:
            try:
                named.append((path.name, read_image(path)))
            except ValueError as error:
                raise ValueError(f"{name}: {str(error).splitlines()[0]}") from None
    if not named:
        raise ValueError(f"{name}: expected at least one image, got none")
    if len(named) > MAX_IMAGES:
        raise ValueError(f"{name}: expected at most {MAX_IMAGES} images in a preview, got {len(named)}")
    return named


def normalize_preview_grid(
    images: Sequence[torch.Tensor | str | Path],
    methods: Sequence[str] | str,
    target: torch.Tensor | str | Path | Sequence[str | Path],
    options: dict[str, dict[str, Any]] | None = None,
    cell_size: int = 192,
    size: int | None = None,
) -> torch.Tensor:
    """Draw a labelled grid: the target, then per image the original and each method's result (uint8 ``(3,H,W)``).

    Args:
        images: tensors ``(3,H,W)``, image files, folders or globs.
        methods: normalization methods (``macenko``, ``reinhard``, ``vahadane``, or a plugin).
        target: the target image (tensor, file, or files pooled into one target).
        options: per-method keyword arguments, e.g. ``{"stainfuser": {"model": DIR}}``.
        cell_size: longest side of a cell.
        size: centre-crop each image to at most ``size`` pixels square first (None: whole).

    Raises:
        ValueError / FileNotFoundError: one line naming ``methods``, ``target`` or ``images``.
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"methods: expected at least one of {available_methods()}, got none")
    for method in methods:
        if method not in available_methods():
            raise ValueError(f"methods: expected names from {available_methods()}, got {method!r}")
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"size: expected a positive number of pixels, got {size!r}")
    named = _images(images, "images")
    if size is not None:
        named = [(name, _centre(image, size)) for name, image in named]
    targets = [target] if isinstance(target, torch.Tensor) else read_targets(
        [str(target)] if isinstance(target, str | Path) else [str(t) for t in target])
    normalizers = {}
    for method in methods:
        try:
            normalizers[method] = build_normalizer(method, **(options or {}).get(method, {})).fit(targets)
        except TypeError as error:
            raise ValueError(f"options: expected settings of the {method!r} normalizer, got {error}") from None
    target_name = Path(target).name if isinstance(target, str | Path) else "target"
    cells: list[Any] = [targets[0]] + [None] * len(methods)
    labels = [f"target {target_name}"] + [""] * len(methods)
    for name, image in named:
        cells.append(image)
        labels.append(name)
        for method, normalizer in normalizers.items():
            with torch.no_grad():
                out, valid = normalizer(image, return_valid=True)
            stats = tile_statistics(normalizer, image[None])[0]
            verdict = "normalized" if bool(valid) else "passed through"
            cells.append(out)
            state = state_label(stats["state"])
            labels.append(f"{method}: {verdict}" + (f"\nsource {state}" if state else ""))
    return labelled_grid(cells, labels, columns=1 + len(methods), cell_size=cell_size)


def _centre(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    crop_h, crop_w = min(size, height), min(size, width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[..., top:top + crop_h, left:left + crop_w]
