"""What genpath's kornia augmentations share: the image contract and replayable, checked params.

kornia is imported through :func:`genpath.utils.quiet_imports.import_kornia`, so its import-time
``torch.jit.script`` FutureWarning is not printed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from augment.params import check_params
from genpath.image_tensor import check_image, to_float_batch
from genpath.utils.quiet_imports import import_kornia

import_kornia()

from kornia.augmentation import GeometricAugmentationBase2D, IntensityAugmentationBase2D  # noqa: E402
from kornia.constants import Resample  # noqa: E402

__all__ = ["GeometricAugmentationBase2D", "IntensityAugmentationBase2D", "ReplayableImageMixin", "Resample"]


def _float_batch(images: object) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """:func:`~genpath.image_tensor.to_float_batch`, with in-place conversions for uint8 (fewer temporaries)."""
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        return to_float_batch(images, "input")
    check_image(images, "input")
    squeeze = images.ndim == 3
    batch = (images[None] if squeeze else images).to(torch.float32).div_(255.0)

    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.mul(255.0).clamp_(0.0, 255.0).round_().to(torch.uint8)
        return out.squeeze(0) if squeeze else out

    return batch, restore


class ReplayableImageMixin:
    """Mix in before a kornia 2D base: uint8 or float, rank 3 or 4 images, and checked replay ``params``.

    Subclasses set ``param_keys`` (keys of :data:`augment.params.PARAM_SCHEMA`) and implement
    kornia's ``generate_parameters`` and ``apply_transform``.
    """

    param_keys: tuple[str, ...] = ()

    def __init__(self, p: float = 0.5, same_on_batch: bool = False) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        super().__init__(p=p, same_on_batch=same_on_batch, keepdim=False)  # type: ignore[call-arg]

    def forward(
        self, input: torch.Tensor, params: dict[str, torch.Tensor] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Transform ``input`` (uint8 or float, ``(B,3,H,W)`` or ``(3,H,W)``); replay ``params`` if given."""
        batch, restore = _float_batch(input)
        if params is not None:
            applied = int(params["batch_prob"].sum()) if "batch_prob" in params else batch.shape[0]
            check_params(params, self.param_keys, applied)
        # transforms with a byte-table path (their result is rounded to bytes anyway) may take it
        self._from_uint8 = isinstance(input, torch.Tensor) and input.dtype == torch.uint8
        try:
            return restore(super().forward(batch, params=params, **kwargs))  # type: ignore[misc]
        finally:
            self._from_uint8 = False
