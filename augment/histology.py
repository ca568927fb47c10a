"""``RandomHistologyTransform``: the HistAug transform family as one kornia augmentation.

It draws one params dict per call with :class:`augment.sampling.AugmentationSampler` (torch's
global RNG, so ``DataLoader`` workers differ) and applies it with
:func:`augment.functional.apply_augmentation_params`. The same dict, handed to a trained
:class:`augment.histaug.HistAugModel`, predicts the embedding of the transformed image.

It is a kornia *geometric* augmentation: the crop and the flips/rotations are also a per-sample
3x3 pixel map (:func:`augment.functional.geometric_matrix`), so in
``kornia.augmentation.AugmentationSequential(..., data_keys=["input", "mask", "bbox_xyxy", "keypoints"])``
masks (nearest resampling, no colour), boxes and keypoints move with the image, and ``inverse``
undoes the geometry. Colour, HED, morphology and blur touch the image only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from augment.base import GeometricAugmentationBase2D, ReplayableImageMixin, Resample
from augment.functional import apply_augmentation_params, apply_geometric_params, geometric_matrix
from augment.params import check_param_ranges
from augment.sampling import TRANSFORM_KEYS, AugmentationSampler
from genpath.image_tensor import to_float_batch

#: the schema keys that move pixels (they also move masks, boxes and keypoints).
GEOMETRIC_KEYS: tuple[str, ...] = ("crop_scale", "crop_center", "dihedral")


class RandomHistologyTransform(ReplayableImageMixin, GeometricAugmentationBase2D):
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
        ``dihedral`` is on). Masks ``(B,C,H,W)`` float (any values), boxes and keypoints follow
        kornia's ``AugmentationSequential`` formats.

    Example:
        >>> aug = RandomHistologyTransform(["hue", "dihedral"], p=1.0)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> torch.equal(aug(x), aug(x, params=aug._params))
        True
        >>> from kornia.augmentation import AugmentationSequential
        >>> mask = (x[:, :1] > 0.5).float()
        >>> seq = AugmentationSequential(RandomHistologyTransform(["dihedral"], p=1.0), data_keys=["input", "mask"])
        >>> out, out_mask = seq(x, mask)
        >>> torch.equal(out_mask, (out[:, :1] > 0.5).float())
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
        self.geometric_keys = tuple(k for k in self.param_keys if k in GEOMETRIC_KEYS)
        # Images are resampled bilinearly; kornia switches masks to nearest.
        self.flags = {"resample": Resample.BILINEAR, "align_corners": True}

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        mode = "wsi" if self.same_on_batch else "patch"
        return self.sampler.sample(batch_shape[0], mode=mode, strength=self.strength)

    def compute_transformation(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any]
    ) -> torch.Tensor:
        """Return the ``(B,3,3)`` pixel map of the sampled crop and dihedral element (identity without them)."""
        if not self.geometric_keys:
            return self.identity_matrix(input)
        check_param_ranges(params, self.geometric_keys)  # the rest is checked where it is applied
        size = (int(input.shape[-2]), int(input.shape[-1]))
        return geometric_matrix({k: params[k] for k in self.geometric_keys}, size).to(input)

    def apply_transform(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        check_param_ranges(params, self.param_keys)
        return apply_augmentation_params(input, {k: params[k] for k in self.param_keys})

    def apply_transform_mask(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        """Apply the same crop and flips/rotations as the image to masks: nearest resampling, no colour ops."""
        return apply_geometric_params(input, {k: params[k] for k in self.geometric_keys}, mode="nearest")

    def inverse_transform(
        self,
        input: torch.Tensor,
        flags: dict[str, Any],
        transform: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Undo the geometry with the inverse pixel map (colour is not undone; cropped-away pixels are 0)."""
        from kornia.geometry.transform import warp_affine

        if transform is None:
            raise ValueError("transform: expected the (B,3,3) inverse matrix, got None")
        size = size or (int(input.shape[-2]), int(input.shape[-1]))
        mode = flags["resample"].name.lower()
        return warp_affine(input, transform[:, :2, :].to(input), size, mode=mode, align_corners=flags["align_corners"])

    def inverse(  # type: ignore[override]
        self, input: torch.Tensor, params: dict[str, torch.Tensor] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Undo the last (or the given ``params``') geometry on images in the same format as ``forward``."""
        batch, restore = to_float_batch(input, "input")
        return restore(super().inverse(batch, params=params, **kwargs))
