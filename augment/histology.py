"""``RandomHistologyTransform``: the HistAug transform family as one kornia augmentation.

It draws one params dict per call with :class:`augment.sampling.AugmentationSampler` (torch's
global RNG, so ``DataLoader`` workers differ) and applies it with
:func:`augment.functional.apply_augmentation_params`. The same dict, handed to a trained
:class:`augment.histaug.HistAugModel`, predicts the embedding of the transformed image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from augment.functional import apply_augmentation_params
from augment.params import check_param_ranges
from augment.sampling import TRANSFORM_KEYS, AugmentationSampler
from augment.stain import StainAugmentationBase


class RandomHistologyTransform(StainAugmentationBase):
    """Colour (brightness, contrast, saturation, hue, gamma), HED shift, morphology, blur, flips/rotations, crop.

    Args:
        transforms: names from :data:`augment.sampling.TRANSFORM_KEYS` (default: all).
        ranges: per-key (low, high) overrides of :data:`augment.sampling.DEFAULT_RANGES`.
        max_radius: largest erosion/dilation radius.
        p_each: probability that each transform is on for a sample.
        strength: shrinks every range towards the identity (0: identity, 1: full ranges).
        p: probability of transforming each sample at all.
        same_on_batch: one draw for the whole batch (HistAug's slide-wise mode).

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)``, uint8 or float; output alike (square images when
        ``dihedral`` is on).

    Example:
        >>> aug = RandomHistologyTransform(["hue", "dihedral"], p=1.0)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> torch.equal(aug(x), aug(x, params=aug._params))
        True
    """

    def __init__(
        self,
        transforms: Sequence[str] = tuple(TRANSFORM_KEYS),
        ranges: dict[str, tuple[float, float]] | None = None,
        max_radius: int = 2,
        p_each: float = 0.5,
        strength: float = 1.0,
        p: float = 0.5,
        same_on_batch: bool = False,
    ) -> None:
        super().__init__(p=p, same_on_batch=same_on_batch)
        self.sampler = AugmentationSampler(transforms, ranges or {}, max_radius, p_each)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
        self.strength = float(strength)
        self.param_keys = self.sampler.keys

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        mode = "wsi" if self.same_on_batch else "patch"
        return self.sampler.sample(batch_shape[0], mode=mode, strength=self.strength)

    def apply_transform(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        check_param_ranges(params, self.param_keys)
        return apply_augmentation_params(input, {k: params[k] for k in self.param_keys})
