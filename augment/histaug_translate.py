"""Translate genpath's augmentation params into the official HistAug parameter dictionary.

genpath's schema (:mod:`augment.params`) and the official one (:data:`augment.histaug_official.OFFICIAL_TRANSFORMS`)
describe overlapping transform families. :func:`to_official_params` maps what has an
equivalent (:data:`TRANSLATION`) and refuses, in one line, what has none (per-channel HED vectors,
crops other than none, LAB targets), so a draw replayed on images can condition an official
checkpoint.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from augment.histaug_official import OFFICIAL_TRANSFORMS
from augment.params import PARAM_SCHEMA, check_param_ranges

#: genpath key -> the official transform it maps to, and how.
TRANSLATION: dict[str, str] = {
    "brightness": "brightness = factor - 1 (official factor is 1 + value)",
    "contrast": "contrast = factor - 1",
    "saturation": "saturation = factor - 1 (genpath scales HSV saturation, the official blends with grey: close)",
    "gamma": "gamma = exponent - 1",
    "hue": "hue = turns (same unit)",
    "dihedral": "rotation = k % 4, h_flip = k >= 4, the rotation placed before the flip",
    "morphology": "erosion = radius < 0, dilation = radius > 0 (official: one 4x4 window; the radius is dropped)",
    "blur_sigma": "gaussian_blur = sigma > 0 (official: one 15-px kernel, sigma 2.6; the sigma is dropped)",
    "crop_scale": "only 1 (no crop): official crops are five fixed 128-px crops",
    "crop_center": "ignored (only used with a crop)",
    "hed_shift": "only 0: official 'hed' is one scalar along a fixed direction of another HED space",
    "hed_scale": "only 1: as hed_shift",
    "stain_vector_shift": "only 0 (no official equivalent)",
    "concentration_scale": "only 1 (no official equivalent)",
    "concentration_shift": "only 0 (no official equivalent)",
    "lab_mean": "none (no official equivalent)",
    "lab_std": "none (no official equivalent)",
}
#: genpath's order of application (:data:`augment.functional.AUGMENTATION_ORDER`) in official names.
TRANSLATION_ORDER = ("crop", "rotation", "h_flip", "v_flip", "erosion", "dilation", "gaussian_blur", "brightness",
                     "contrast", "saturation", "hue", "gamma", "hed")
_DEFAULT_TRANSFORMS = {n: (1.0 if s is not None else [-0.5, 0.5]) for n, s in OFFICIAL_TRANSFORMS.items()}


def to_official_params(
    params: Mapping[str, torch.Tensor], transforms: Mapping[str, Any] | None = None
) -> OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Translate genpath's params into the official ``{name: (value, position)}`` (:data:`TRANSLATION`).

    Args:
        params: keys of :data:`augment.params.PARAM_SCHEMA`, leading size ``n`` or 1; absent keys
            are the identity.
        transforms: the checkpoint's ``transforms["parameters"]`` (names it knows, continuous
            ranges it was trained on; ``model.transforms_parameters``); default: all 13 with the
            published bound [-0.5, 0.5].

    Returns:
        exactly the checkpoint's names; positions follow genpath's order of application.

    Raises:
        ValueError: one line, for a key with no official equivalent (HED vectors, crops, LAB), a
            value outside the trained range, or a transform the checkpoint does not know.

    Example:
        >>> out = to_official_params({"brightness": torch.tensor([1.2]), "dihedral": torch.tensor([5.0])})
        >>> [round(out[k][0].item(), 3) for k in ("brightness", "rotation", "h_flip", "crop")]
        [0.2, 1, 1, 0]
    """
    transforms = dict(_DEFAULT_TRANSFORMS if transforms is None else transforms)
    unknown = sorted(set(params) - set(PARAM_SCHEMA) - {"batch_prob", "forward_input_shape"})
    values = {k: torch.as_tensor(v).detach().cpu() for k, v in params.items() if k in PARAM_SCHEMA}
    if unknown or not values:
        raise ValueError(f"params: expected keys from {sorted(PARAM_SCHEMA)}, got {sorted(params)}")
    n = max(len(v) if v.ndim else 0 for v in values.values())
    for key, value in values.items():
        if value.ndim == 0 or tuple(value.shape[1:]) != PARAM_SCHEMA[key].shape or len(value) not in (1, n):
            raise ValueError(f"params[{key!r}]: expected shape ({n} or 1, *{PARAM_SCHEMA[key].shape}), got "
                             f"{tuple(value.shape)}")
        values[key] = value.float().expand(n, *value.shape[1:])
    check_param_ranges(values, tuple(values))
    out = {name: torch.zeros(n, dtype=torch.float32 if size is None else torch.long)
           for name, size in OFFICIAL_TRANSFORMS.items()}
    for key, value in values.items():
        if key in ("brightness", "contrast", "saturation", "gamma"):
            out[key] = value - 1.0
        elif key == "hue":
            out["hue"] = value.clone()
        elif key == "dihedral":
            k = value.round().long()
            out["rotation"], out["h_flip"] = k % 4, (k >= 4).long()
        elif key == "morphology":
            out["erosion"], out["dilation"] = (value < 0).long(), (value > 0).long()
        elif key == "blur_sigma":
            out["gaussian_blur"] = (value > 0).long()
        elif key != "crop_center" and not (PARAM_SCHEMA[key].identity is not None
                                           and bool((value == PARAM_SCHEMA[key].identity).all())):
            raise ValueError(f"params[{key!r}]: no official HistAug equivalent; accepted: {TRANSLATION[key]}, got "
                             f"values in [{value.min().item():.4g}, {value.max().item():.4g}]")
    for name, value in out.items():
        setting = transforms.get(name)
        if setting is None and bool(value.any()):
            raise ValueError(f"params: the checkpoint was not trained on {name!r}, got non-identity values for it")
        if OFFICIAL_TRANSFORMS[name] is None and setting is not None:
            low, high = map(float, setting)
            if value.min() < low - 1e-6 or value.max() > high + 1e-6:
                raise ValueError(f"params: official {name!r} must lie in the trained range [{low}, {high}], got "
                                 f"[{value.min().item():.4g}, {value.max().item():.4g}] ({TRANSLATION[name]})")
    order = [name for name in TRANSLATION_ORDER if name in transforms]
    return OrderedDict((name, (out[name], torch.full((n,), order.index(name), dtype=torch.long)))
                       for name in sorted(transforms))
