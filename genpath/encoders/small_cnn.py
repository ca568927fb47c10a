"""genpath's own small SSL encoder: a compact ResNet trained with SimCLR on stain-augmented tiles."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.GroupNorm(8, cout),
        )
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class SmallHistologyEncoder(ModelMixin, ConfigMixin):
    """A small residual CNN backbone: pixels ``(B,3,S,S)`` (normalized) → embeddings ``(B,D)``.

    Args:
        widths: channels of each stage (each stage halves the resolution).
        embed_dim: output dimension ``D`` (a linear map after global average pooling).
        input_size: side of the images it was trained on.
        mean: normalization mean used in training.
        std: normalization std used in training.
        stem_stride: stride of the first convolution (2 halves the cost of every later stage).

    Example:
        >>> model = SmallHistologyEncoder(widths=(16, 32), embed_dim=24)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 24])
    """

    @register_to_config
    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        embed_dim: int = 256,
        input_size: int = 96,
        mean: tuple[float, float, float] = (0.70, 0.55, 0.70),
        std: tuple[float, float, float] = (0.15, 0.20, 0.15),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, stem_stride, 1, bias=False), nn.GroupNorm(8, widths[0]), nn.SiLU(),
        ]
        cin = widths[0]
        for width in widths:
            layers.append(_Block(cin, width, 2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, embed_dim)

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Token grid ``(B, h·w, D)`` of the last stage (projected to ``D``)."""
        grid = self.features(pixels)
        return self.head(grid.flatten(2).transpose(1, 2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).mean((2, 3)))
