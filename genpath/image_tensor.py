"""The image tensor contract shared by every genpath operation.

Images are RGB, channels first, ``(B,3,H,W)`` or ``(3,H,W)``, either ``uint8`` in [0, 255]
or floating point in [0, 1]. Operations compute in float and hand results back in the
caller's dtype, rank and device. These helpers do the checking and the round trip so that
every function and module reports bad input the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DTYPES = (torch.uint8, *FLOAT_DTYPES)


def check_image(images: object, name: str = "images") -> torch.Tensor:
    """Validate an RGB image tensor and return it unchanged.

    Args:
        images: candidate tensor.
        name: the argument's name, used in error messages.

    Returns:
        The same tensor.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: wrong rank or channel count, empty, non-finite, or float values outside [0, 1].

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)``.

    Example:
        >>> check_image(torch.zeros(3, 8, 8)).shape
        torch.Size([3, 8, 8])
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}: expected dtype uint8 or a float dtype, got {images.dtype}"
        )
    if images.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected shape (B,3,H,W) or (3,H,W), got {tuple(images.shape)}"
        )
    if images.shape[-3] != 3:
        raise ValueError(
            f"{name}: expected 3 RGB channels in dim -3, got shape {tuple(images.shape)}"
        )
    if images.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(images.shape)}")
    if images.is_floating_point():
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or inf")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{name}: expected float values in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
            )
    return images


def to_float_batch(
    images: object, name: str = "images"
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Check ``images`` and return a float ``(B,3,H,W)`` copy plus a function that restores the format.

    Float16/bfloat16 inputs compute in float32; float64 stays float64. The restore function
    clamps to [0, 1], then converts back to the input's dtype (uint8 is rounded) and rank.

    Args:
        images: RGB tensor following the contract above.
        name: the argument's name, used in error messages.

    Returns:
        ``(batch, restore)``: the float batch in [0, 1] and the inverse format conversion.

    Shape:
        batch: ``(B,3,H,W)``.

    Example:
        >>> x = torch.full((3, 4, 4), 128, dtype=torch.uint8)
        >>> batch, restore = to_float_batch(x)
        >>> restore(batch).dtype, restore(batch).shape
        (torch.uint8, torch.Size([3, 4, 4]))
    """
    images = check_image(images, name)
    dtype, squeeze = images.dtype, images.ndim == 3
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    batch = images.unsqueeze(0) if squeeze else images
    batch = batch.to(compute) / 255.0 if dtype == torch.uint8 else batch.to(compute, copy=True)

    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.clamp(0.0, 1.0)
        out = (out * 255.0).round().to(torch.uint8) if dtype == torch.uint8 else out.to(dtype)
        return out.squeeze(0) if squeeze else out

    return batch, restore
