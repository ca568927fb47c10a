"""The encoder interface: images ``(B,3,H,W)`` in [0, 1] (or uint8) → embeddings ``(B,D)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from genpath.image_tensor import to_float_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_image(rgb: torch.Tensor, size: int, interpolation: str = "bilinear",
                 center_crop: bool = False) -> torch.Tensor:
    """Resize a float batch ``(B,3,H,W)`` in [0, 1] to ``(B,3,size,size)`` (antialiased), clamped to [0, 1].

    ``center_crop``: resize the short side to ``size`` (the long side to ``int(size * long / short)``)
    and crop the centre, as torchvision's ``Resize(size)`` + ``CenterCrop(size)``; otherwise squash.

    Example:
        >>> resize_image(torch.rand(1, 3, 40, 30), 28, "bicubic", center_crop=True).shape
        torch.Size([1, 3, 28, 28])
    """
    height, width = rgb.shape[-2:]
    if center_crop and height != width:
        short, long = min(height, width), max(height, width)
        target = (size, int(size * long / short)) if height < width else (int(size * long / short), size)
    else:
        target = (size, size)
    if tuple(rgb.shape[-2:]) != target:
        rgb = F.interpolate(rgb, size=target, mode=interpolation, antialias=True, align_corners=False)
    top, left = int(round((target[0] - size) / 2.0)), int(round((target[1] - size) / 2.0))
    return rgb[..., top:top + size, left:left + size].clamp(0.0, 1.0)


class ImageEncoder(nn.Module):
    """Base class of registered encoders.

    Subclasses set ``embed_dim``, ``input_size``, ``mean`` and ``std`` and implement
    :meth:`encode` on preprocessed input; encoders with a spatial token grid also implement
    :meth:`encode_tokens`. :meth:`forward` checks input, resizes to ``input_size`` (antialiased,
    ``interpolation`` bilinear or bicubic; with ``center_crop`` the short side is resized and the
    centre cropped, torchvision's ``Resize(S)`` + ``CenterCrop(S)``, else the image is squashed to
    ``S×S``), clamps to [0, 1] (what a uint8 PIL resize does) and normalizes with ``mean``/``std``.

    Attributes:
        name: registry name it was created under.
        embed_dim: ``D``.
        input_size: side the images are resized to (None: any size).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        interpolation: ``bilinear`` or ``bicubic``.
        center_crop: resize the short side and crop the centre (True) or squash (False).
    """

    name: str = ""

    def __init__(
        self,
        embed_dim: int,
        input_size: int | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        center_crop: bool = False,
    ) -> None:
        super().__init__()
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation: expected bilinear or bicubic, got {interpolation!r}")
        self.embed_dim, self.input_size = int(embed_dim), input_size
        self.interpolation, self.center_crop = interpolation, bool(center_crop)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def has_tokens(self) -> bool:
        return type(self).encode_tokens is not ImageEncoder.encode_tokens

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Check, convert to float ``(B,3,S,S)`` at ``input_size`` and normalize."""
        rgb, _ = to_float_batch(images, "images")
        rgb = rgb.to(self.mean.device)
        if self.input_size and tuple(rgb.shape[-2:]) != (self.input_size, self.input_size):
            rgb = resize_image(rgb, self.input_size, self.interpolation, self.center_crop)
        return (rgb - self.mean) / self.std

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no token grid")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images.

        Shape:
            images ``(B,3,H,W)`` or ``(3,H,W)`` (uint8 or float in [0, 1]) → ``(B,D)`` (``(D,)`` for rank 3).
        """
        out = self.encode(self.preprocess(images))
        return out[0] if images.ndim == 3 else out

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Token grid ``(B,N,D)`` for encoders that have one."""
        return self.encode_tokens(self.preprocess(images))

    def describe(self) -> dict:
        return {"name": self.name, "embed_dim": self.embed_dim, "input_size": self.input_size,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(), "tokens": self.has_tokens,
                "interpolation": self.interpolation, "center_crop": self.center_crop}
