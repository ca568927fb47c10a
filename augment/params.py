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
========================  =========  ==========  ===================================================

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
    """

    shape: tuple[int, ...]
    identity: float | None
    description: str


PARAM_SCHEMA: dict[str, ParamSpec] = {
    "hed_scale": ParamSpec((3,), 1.0, "factor on H, E, DAB concentrations"),
    "hed_shift": ParamSpec((3,), 0.0, "shift added to H, E, DAB concentrations"),
    "stain_vector_shift": ParamSpec((3, 2), 0.0, "shift added to the unit H and E OD vectors"),
    "concentration_scale": ParamSpec((2,), 1.0, "factor on H and E concentrations"),
    "concentration_shift": ParamSpec((2,), 0.0, "shift added to H and E concentrations"),
    "lab_mean": ParamSpec((3,), None, "target LAB channel means"),
    "lab_std": ParamSpec((3,), None, "target LAB channel standard deviations"),
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
