"""The named parameter schema shared by genpath's image transforms and feature-space augmenters.

Every random transform draws a dict of tensors whose keys come from :data:`PARAM_SCHEMA`; the
first dimension is the number of samples the draw applies to. The same dict can be replayed on
images (``transform(x, params=params)``) or handed to a feature-space model (HistAug) so that a
training example is exactly ``(embed(x), params, embed(T(x, params)))``.

========================  =========  ==========  ===================================================
key                       shape      identity    meaning
========================  =========  ==========  ===================================================
``hed_scale``             ``(N,3)``  1           factor on H, E, DAB concentrations (Tellez et al.)
``hed_shift``             ``(N,3)``  0           shift added to H, E, DAB concentrations
``stain_vector_shift``    ``(N,3,2)``  0         shift added to the unit H and E OD vectors
``concentration_scale``   ``(N,2)``  1           factor on H and E concentrations (Macenko basis)
``concentration_shift``   ``(N,2)``  0           shift added to H and E concentrations
``lab_mean``              ``(N,3)``  own mean    target LAB channel means (RandStainNA)
``lab_std``               ``(N,3)``  own std     target LAB channel standard deviations
``brightness``            ``(N,)``   1           factor on RGB
``contrast``              ``(N,)``   1           blend factor with the grey mean (torchvision semantics)
``saturation``            ``(N,)``   1           factor on HSV saturation
``hue``                   ``(N,)``   0           hue rotation, in turns (-0.5..0.5)
``gamma``                 ``(N,)``   1           exponent on RGB
``morphology``            ``(N,)``   0           integer radius: < 0 grey erosion, > 0 grey dilation
``blur_sigma``            ``(N,)``   0           Gaussian blur sigma in pixels
``dihedral``              ``(N,)``   0           integer 0..7: ``k % 4`` quarter turns, then a
                                                 horizontal flip if ``k >= 4``
``crop_scale``            ``(N,)``   1           side of a square crop, as a share of the side,
                                                 resized back to the input size
``crop_center``           ``(N,2)``  0.5         crop position (y, x) in [0, 1] of the free room
========================  =========  ==========  ===================================================

Every key also has a documented valid range (:attr:`ParamSpec.low`, :attr:`ParamSpec.high`);
discrete keys take integer values in it.

Kornia adds ``batch_prob`` (which samples were transformed) and ``forward_input_shape``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpec:
    """One named transform parameter.

    Attributes:
        shape: per-sample shape (the leading sample dimension is not included).
        identity: the value that leaves an image unchanged, or None when it depends on the image.
        description: what the parameter does.
        low: smallest valid value.
        high: largest valid value.
        discrete: values are integers in ``[low, high]``.
    """

    shape: tuple[int, ...]
    identity: float | None
    description: str
    low: float = float("-inf")
    high: float = float("inf")
    discrete: bool = False

    @property
    def num_values(self) -> int:
        """Number of integer values of a discrete key."""
        if not self.discrete:
            raise ValueError("num_values: only discrete keys have a finite number of values")
        return int(self.high - self.low) + 1


PARAM_SCHEMA: dict[str, ParamSpec] = {
    "hed_scale": ParamSpec((3,), 1.0, "factor on H, E, DAB concentrations", 0.0, 3.0),
    "hed_shift": ParamSpec((3,), 0.0, "shift added to H, E, DAB concentrations", -1.0, 1.0),
    "stain_vector_shift": ParamSpec((3, 2), 0.0, "shift added to the unit H and E OD vectors", -1.0, 1.0),
    "concentration_scale": ParamSpec((2,), 1.0, "factor on H and E concentrations", 0.0, 5.0),
    "concentration_shift": ParamSpec((2,), 0.0, "shift added to H and E concentrations", -2.0, 2.0),
    "lab_mean": ParamSpec((3,), None, "target LAB channel means", -128.0, 128.0),
    "lab_std": ParamSpec((3,), None, "target LAB channel standard deviations", 0.0, 128.0),
    "brightness": ParamSpec((), 1.0, "factor on RGB", 0.0, 3.0),
    "contrast": ParamSpec((), 1.0, "blend factor with the grey mean", 0.0, 3.0),
    "saturation": ParamSpec((), 1.0, "factor on HSV saturation", 0.0, 3.0),
    "hue": ParamSpec((), 0.0, "hue rotation in turns", -0.5, 0.5),
    "gamma": ParamSpec((), 1.0, "exponent on RGB", 0.2, 5.0),
    "morphology": ParamSpec((), 0.0, "grey erosion (<0) or dilation (>0) radius", -4.0, 4.0, True),
    "blur_sigma": ParamSpec((), 0.0, "Gaussian blur sigma in pixels", 0.0, 5.0),
    "dihedral": ParamSpec((), 0.0, "quarter turns (k % 4), then a flip if k >= 4", 0.0, 7.0, True),
    "crop_scale": ParamSpec((), 1.0, "crop side as a share of the input side", 0.25, 1.0),
    "crop_center": ParamSpec((2,), 0.5, "crop position (y, x) in the free room", 0.0, 1.0),
}


def check_params(params: dict[str, torch.Tensor], keys: tuple[str, ...], n: int) -> None:
    """Check that ``params`` holds ``keys`` with the schema's shapes for ``n`` samples.

    Raises:
        KeyError: a key is missing.
        ValueError: a tensor has the wrong shape or non-finite values.

    Example:
        >>> check_params({"hed_scale": torch.ones(2, 3)}, ("hed_scale",), 2)
    """
    for key in keys:
        if key not in params:
            raise KeyError(f"params: expected key {key!r} (schema {PARAM_SCHEMA[key].shape}), got {sorted(params)}")
        value = params[key]
        expected = (n, *PARAM_SCHEMA[key].shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"params[{key!r}]: expected shape {expected}, got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"params[{key!r}]: expected finite values, got NaN or inf")


def identity_params(keys: tuple[str, ...], n: int) -> dict[str, torch.Tensor]:
    """Parameters that leave images unchanged, for keys with a constant identity."""
    out = {}
    for key in keys:
        spec = PARAM_SCHEMA[key]
        if spec.identity is None:
            raise ValueError(f"keys: {key!r} has no image-independent identity value")
        out[key] = torch.full((n, *spec.shape), spec.identity)
    return out


def check_param_ranges(params: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Check that ``params[key]`` lies in the schema's documented range (integers for discrete keys).

    Raises:
        ValueError: a value is outside ``[low, high]`` or a discrete value is not an integer.

    Example:
        >>> check_param_ranges({"hue": torch.tensor([0.1])}, ("hue",))
    """
    for key in keys:
        spec, value = PARAM_SCHEMA[key], params[key]
        low, high = float(value.min()), float(value.max())
        if low < spec.low or high > spec.high:
            raise ValueError(f"params[{key!r}]: expected values in [{spec.low}, {spec.high}] ({spec.description}), "
                             f"got values in [{low:.4g}, {high:.4g}]")
        if spec.discrete and not bool((value == value.round()).all()):
            raise ValueError(f"params[{key!r}]: expected integer values ({spec.description}), got fractions")
