"""See what an augmentation's parameters do: a labelled grid of one image under ``n`` replayable draws.

:func:`preview_grid` draws the parameters of ``n`` samples with the transform's own sampler
(``forward_parameters``, under a fixed seed in a forked RNG, so the caller's random state is
untouched and the same seed gives the same grid), applies them with ``params=`` (replay) and
writes each cell's values under it, so a user can choose ranges by eye. The first cell is the
untouched image.

``strength`` scales the transform's default ranges: ``hed`` (:class:`~augment.RandomHEDJitter`,
scale ``1 ± 0.05·S``, shift ``± 0.05·S``), ``stain`` (:class:`~augment.RandomStainJitter`,
vector shift ``0.05·S``, concentration scale ``1 ± 0.2·S``, shift ``± 0.1·S``), ``stainna``
(:class:`~augment.RandomStainNA` with ``spread=S``, LAB statistics fitted on crops of the image
unless ``statistics`` is given) and ``histology`` (:class:`~augment.RandomHistologyTransform`
with ``strength=S``, in [0, 1]).

Example:
    >>> import torch
    >>> image = torch.randint(60, 200, (3, 64, 64), dtype=torch.uint8)
    >>> grid = preview_grid(image, transform="hed", n=4, seed=0)
    >>> grid.dtype, torch.equal(grid, preview_grid(image, transform="hed", n=4, seed=0))
    (torch.uint8, True)
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import torch

from augment.histology import RandomHistologyTransform
from augment.stain import RandomHEDJitter, RandomStainJitter, RandomStainNA, StainNAStatistics
from genpath.image_tensor import to_float_batch
from genpath.report.grid import labelled_grid

__all__ = ["MAX_CELLS", "MAX_STRENGTH", "TRANSFORMS", "build_preview_transform", "preview_grid", "preview_labels"]
TRANSFORMS = ("hed", "stain", "stainna", "histology")
#: largest ``strength`` per transform (beyond it factors turn negative or leave the schema's range)
MAX_STRENGTH = {"hed": 10.0, "stain": 5.0, "stainna": 10.0, "histology": 1.0}
MAX_CELLS = 256


def check_preview_args(transform: object, n: object, strength: object, seed: object) -> None:
    """Raise a one-line ``ValueError`` naming the first bad argument."""
    if transform not in TRANSFORMS:
        raise ValueError(f"transform: expected one of {', '.join(TRANSFORMS)}, got {transform!r}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_CELLS:
        raise ValueError(f"n: expected an integer in [1, {MAX_CELLS}], got {n!r}")
    high = MAX_STRENGTH[str(transform)]
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(float(strength)) \
            or not 0.0 <= float(strength) <= high:
        raise ValueError(f"strength: expected a finite number in [0, {high:g}] for {transform}, got {strength!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an integer in [0, 2**63), got {seed!r}")


def _crops(image: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Non-overlapping crops of ``size`` (at least 4, halving ``size`` if needed) to fit RandStainNA statistics."""
    height, width = image.shape[-2:]
    while size > 16 and (height // size) * (width // size) < 4:
        size //= 2
    crops = [image[:, y:y + size, x:x + size] for y in range(0, height - size + 1, size)
             for x in range(0, width - size + 1, size)]
    if len(crops) > 16:  # 16 crops spread over the image are plenty for a distribution of LAB statistics
        crops = [crops[round(i * (len(crops) - 1) / 15)] for i in range(16)]
    return crops if len(crops) >= 2 else [image, image.flip(-1)]


def build_preview_transform(transform: str, strength: float = 1.0, image: torch.Tensor | None = None,
                            statistics: StainNAStatistics | None = None) -> Any:
    """Build the augmentation behind a preview (every sample transformed: ``p=1``)."""
    s = float(strength)
    if transform == "hed":
        return RandomHEDJitter(scale=0.05 * s, shift=0.05 * s, p=1.0)
    if transform == "stain":
        return RandomStainJitter(vector_shift=0.05 * s, concentration_scale=0.2 * s, concentration_shift=0.1 * s,
                                 p=1.0)
    if transform == "stainna":
        if statistics is None:
            if image is None:
                raise ValueError("statistics: expected RandStainNA statistics or an image to fit them on, got neither")
            statistics = StainNAStatistics.fit(_crops(image, 128))
        return RandomStainNA(statistics, spread=s, p=1.0)
    if transform == "histology":
        return RandomHistologyTransform(strength=s, p=1.0)
    raise ValueError(f"transform: expected one of {', '.join(TRANSFORMS)}, got {transform!r}")


def _signed(values: torch.Tensor) -> str:
    return " ".join(f"{float(v):+.2f}" for v in values)


def _histology_label(params: dict[str, torch.Tensor], i: int) -> str:
    parts = []
    names = {"brightness": "bright", "contrast": "contr", "saturation": "sat", "gamma": "gamma"}
    for key, short in names.items():
        if key in params and abs(float(params[key][i]) - 1.0) > 1e-6:
            parts.append(f"{short} {float(params[key][i]):.2f}")
    if "hue" in params and abs(float(params["hue"][i])) > 1e-6:
        parts.append(f"hue {float(params['hue'][i]):+.3f}")
    if "hed_shift" in params and bool(params["hed_shift"][i].abs().gt(1e-6).any()):
        parts.append(f"hed {_signed(params['hed_shift'][i])}")
    if "morphology" in params and int(params["morphology"][i]):
        radius = int(params["morphology"][i])
        parts.append(f"{'dilate' if radius > 0 else 'erode'} {abs(radius)}")
    if "blur_sigma" in params and float(params["blur_sigma"][i]) > 1e-6:
        parts.append(f"blur {float(params['blur_sigma'][i]):.2f}")
    if "dihedral" in params and int(params["dihedral"][i]):
        k = int(params["dihedral"][i])
        parts.append(f"rot90x{k % 4}" + (" flip" if k >= 4 else ""))
    if "crop_scale" in params and float(params["crop_scale"][i]) < 1.0 - 1e-6:
        parts.append(f"crop {float(params['crop_scale'][i]):.2f}")
    return " ".join(parts) or "identity"


def preview_labels(transform: str, params: dict[str, torch.Tensor]) -> list[str]:
    """One label per sample of ``params``: the parameter values that sample was drawn with."""
    n = int(next(v for k, v in params.items() if k not in ("batch_prob", "forward_input_shape")).shape[0])
    labels = []
    for i in range(n):
        if transform == "hed":
            scale = " ".join(f"{c}x{float(v):.2f}" for c, v in zip("HED", params["hed_scale"][i], strict=True))
            labels.append(f"{scale}\nshift {_signed(params['hed_shift'][i])}")
        elif transform == "stain":
            scale = " ".join(f"{c}x{float(v):.2f}" for c, v in zip("HE", params["concentration_scale"][i], strict=True))
            shift = float(params["stain_vector_shift"][i].abs().max())
            labels.append(f"{scale} shift {_signed(params['concentration_shift'][i])}\nvector shift max {shift:.3f}")
        elif transform == "stainna":
            mean, std = params["lab_mean"][i], params["lab_std"][i]
            stats = " ".join(f"{c} {float(m):.0f}±{float(s):.0f}" for c, m, s in zip("Lab", mean, std, strict=True))
            labels.append(f"{stats}\n(LAB mean±std)")
        else:
            labels.append(_histology_label(params, i))
    return labels


def preview_grid(
    image: torch.Tensor | str | Path,
    transform: str = "hed",
    n: int = 16,
    strength: float = 1.0,
    seed: int = 0,
    size: int | None = 256,
    columns: int | None = None,
    cell_size: int = 192,
    statistics: StainNAStatistics | None = None,
    original: bool = True,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor], list[str]]:
    """Draw a labelled grid of ``image`` under ``n`` draws of ``transform`` (uint8 ``(3,H,W)``).

    Args:
        image: uint8 or float ``(3,H,W)`` tensor, or an image file.
        transform: ``hed``, ``stain``, ``stainna`` or ``histology``.
        n: cells in the grid (the first is the untouched image when ``original``).
        strength: scales the default ranges (module doc); ``histology``: in [0, 1].
        seed: the draw (same seed, same grid; torch's global RNG is left as it was).
        size: centre-crop the image to at most ``size`` pixels square first (the tile a model
            would see; blur and morphology act in pixels); None keeps it whole.
        columns: cells per row (default about square).
        cell_size: longest side of a cell in the grid.
        statistics: RandStainNA statistics (default: fitted on crops of the image).
        original: make the first cell the untouched image.
        return_params: also return the drawn parameters (replay them with ``aug(x, params=...)``)
            and the labels.

    Raises:
        ValueError: one line naming a bad ``transform``, ``n``, ``strength``, ``seed`` or image.
        FileNotFoundError: ``image`` names a missing file.
    """
    check_preview_args(transform, n, strength, seed)
    if isinstance(image, str | Path):
        from genpath.io.images import read_image

        image = read_image(image)
    batch, _ = to_float_batch(image, "image")
    if batch.shape[0] != 1:
        raise ValueError(f"image: expected one image (3,H,W), got a batch of {batch.shape[0]}")
    whole = batch[0]
    if size is not None:
        height, width = whole.shape[-2:]
        crop = min(size, height, width)
        top, left = (height - crop) // 2, (width - crop) // 2
        batch = batch[..., top:top + crop, left:left + crop]
    draws = n - 1 if original else n
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        aug = build_preview_transform(transform, float(strength), whole, statistics)
        if draws:
            inputs = batch.expand(draws, *batch.shape[1:]).contiguous()
            params = aug.forward_parameters(inputs.shape)
            outputs = aug(inputs, params=params)
        else:
            params, outputs = {}, batch[:0]
    labels = preview_labels(transform, params) if draws else []
    cells = ([batch[0]] if original else []) + list(outputs)
    labels = (["original"] if original else []) + labels
    grid = labelled_grid(cells, labels, columns=columns, cell_size=cell_size)
    return (grid, params, labels) if return_params else grid
