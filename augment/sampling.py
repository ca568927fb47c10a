"""One parameter sampler for the HistAug transform family, shared by image transforms and HistAug.

:class:`AugmentationSampler` draws a params dict in the schema of :mod:`augment.params`. The
image transform (:class:`augment.histology.RandomHistologyTransform`) and the feature-space
model (:meth:`augment.histaug.HistAugModel.sample_params`) both call it, so a training pair
``(embed(x), params, embed(T(x, params)))`` and a HistAug call at training time see the same
distribution.

1. Each transform is switched on independently with probability ``p_each``; when off, its keys
   hold their identity value (the model learns the identity too).
2. Continuous values are uniform in the transform's range; ``strength`` shrinks every range
   towards the identity (``identity + strength · (value - identity)``).
3. Discrete values: ``dihedral`` is uniform over the 8 symmetries; ``morphology`` is a radius
   in ``±max_radius`` (scaled by ``strength``).
4. ``mode="wsi"`` draws once and repeats it for all ``n`` (slide-wise consistency); ``"patch"``
   draws per sample. Draws use torch's RNG (``generator`` or the global one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from augment.params import PARAM_SCHEMA

#: transform name -> the schema keys it sets.
TRANSFORM_KEYS: dict[str, tuple[str, ...]] = {
    "brightness": ("brightness",),
    "contrast": ("contrast",),
    "saturation": ("saturation",),
    "hue": ("hue",),
    "gamma": ("gamma",),
    "hed_shift": ("hed_shift",),
    "morphology": ("morphology",),
    "blur": ("blur_sigma",),
    "dihedral": ("dihedral",),
    "crop": ("crop_scale", "crop_center"),
}

#: default ranges (low, high) of the continuous keys; moderate, HistAug-like strengths.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "brightness": (0.75, 1.25),
    "contrast": (0.7, 1.3),
    "saturation": (0.7, 1.3),
    "hue": (-0.05, 0.05),
    "gamma": (0.7, 1.5),
    "hed_shift": (-0.03, 0.03),
    "blur_sigma": (0.0, 1.5),
    "crop_scale": (0.6, 1.0),
    "crop_center": (0.0, 1.0),
}


@dataclass
class AugmentationSampler:
    """Draw params for a set of transforms.

    Args:
        transforms: names from :data:`TRANSFORM_KEYS` (default: all).
        ranges: overrides of :data:`DEFAULT_RANGES` per key.
        max_radius: largest morphology radius.
        p_each: probability that each transform is on for a sample.

    Example:
        >>> s = AugmentationSampler(["hue", "dihedral"])
        >>> sorted(s.sample(4, generator=torch.Generator().manual_seed(0)))
        ['dihedral', 'hue']
    """

    transforms: Sequence[str] = tuple(TRANSFORM_KEYS)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    max_radius: int = 2
    p_each: float = 0.5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.transforms) - set(TRANSFORM_KEYS))
        if unknown or not self.transforms:
            raise ValueError(f"transforms: expected names from {sorted(TRANSFORM_KEYS)}, got {list(self.transforms)}")
        self.transforms = tuple(self.transforms)
        bad = sorted(set(self.ranges) - set(DEFAULT_RANGES))
        if bad:
            raise ValueError(f"ranges: expected keys from {sorted(DEFAULT_RANGES)}, got {bad}")
        self.ranges = {k: (float(v[0]), float(v[1])) for k, v in {**DEFAULT_RANGES, **self.ranges}.items()}
        for key, (low, high) in self.ranges.items():
            spec = PARAM_SCHEMA[key]
            if not spec.low <= low <= high <= spec.high:
                raise ValueError(f"ranges[{key!r}]: expected low <= high within [{spec.low}, {spec.high}], "
                                 f"got ({low}, {high})")
        if not 0 <= self.max_radius <= PARAM_SCHEMA["morphology"].high:
            raise ValueError(f"max_radius: expected 0..{int(PARAM_SCHEMA['morphology'].high)}, got {self.max_radius}")
        if not 0.0 <= self.p_each <= 1.0:
            raise ValueError(f"p_each: expected a probability in [0, 1], got {self.p_each}")

    @property
    def keys(self) -> tuple[str, ...]:
        """Schema keys the sampler sets, in a fixed order."""
        return tuple(k for t in self.transforms for k in TRANSFORM_KEYS[t])

    def sample(
        self, n: int, mode: str = "patch", generator: torch.Generator | None = None, strength: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Draw params for ``n`` samples (``"wsi"``: one draw shared by all ``n``).

        Shape:
            each value ``(n, *PARAM_SCHEMA[key].shape)``, float32.
        """
        if mode not in ("patch", "wsi"):
            raise ValueError(f"mode: expected 'patch' or 'wsi', got {mode!r}")
        if n < 0:
            raise ValueError(f"n: expected a sample count >= 0, got {n}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
        m = 1 if mode == "wsi" else n

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator)

        out: dict[str, torch.Tensor] = {}
        for name in self.transforms:
            on = rand(m) < self.p_each
            for key in TRANSFORM_KEYS[name]:
                spec = PARAM_SCHEMA[key]
                identity = float(spec.identity)  # a scalar: the same float32 arithmetic as a full tensor
                if key == "dihedral":
                    value = torch.randint(0, 8, (m,), generator=generator).float()
                elif key == "morphology":
                    radius = round(self.max_radius * strength)
                    value = torch.randint(-radius, radius + 1, (m,), generator=generator).float()
                elif key == "crop_center":
                    low, high = self.ranges[key]
                    value = low + (high - low) * rand(m, *spec.shape)  # a position, not a strength
                else:
                    low, high = self.ranges[key]
                    value = low + (high - low) * rand(m, *spec.shape)
                    if strength != 1.0:
                        value = identity + strength * (value - identity)
                value = torch.where(on.reshape(m, *([1] * len(spec.shape))), value, identity)
                out[key] = value if m == n else value.expand(n, *spec.shape).clone()
        return out
