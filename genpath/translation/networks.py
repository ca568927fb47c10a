"""Networks of the one-step translator: a ResNet generator, a PatchGAN critic, a patch sampler.

The generator is CUT/ASP's ResNet generator at small width (reflection-padded 7×7 stem, two
stride-2 downsamplings, residual blocks, two upsamplings, a sigmoid head so outputs are images
in [0, 1]). :meth:`ResnetTranslator.encode_layers` exposes the encoder features PatchNCE compares;
:class:`PatchSampler` draws the same patch locations from two feature stacks and projects them
with one small MLP per layer. All three are diffusers ``ModelMixin``/``ConfigMixin``, so they
save and load with ``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=True)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetTranslator(ModelMixin, ConfigMixin):
    """Image-to-image ResNet generator (one forward pass per tile).

    Args:
        base_channels: width of the stem (doubles at each downsampling).
        num_residual_blocks: residual blocks at the bottleneck.
        num_downsamplings: stride-2 stages (input sides must be divisible by ``2**n``).
        nce_layers: indices into :meth:`encode_layers`' list used by PatchNCE.
        upsampling: ``"transposed"`` (CUT's stride-2 transposed convolutions) or ``"resize_conv"``
            (nearest-neighbour ×2 then a 3×3 convolution; avoids the checkerboard artefacts of
            transposed convolutions, Odena et al. 2016).

    Shape:
        ``(B,3,H,W)`` float in [0, 1] -> ``(B,3,H,W)`` float in [0, 1].

    Example:
        >>> g = ResnetTranslator(base_channels=8, num_residual_blocks=1)
        >>> g(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 3, 32, 32])
    """

    @register_to_config
    def __init__(self, base_channels: int = 32, num_residual_blocks: int = 6, num_downsamplings: int = 2,
                 nce_layers: tuple[int, ...] = (0, 1, 2, 4), upsampling: str = "transposed") -> None:
        super().__init__()
        if upsampling not in ("transposed", "resize_conv"):
            raise ValueError(f"upsampling: expected 'transposed' or 'resize_conv', got {upsampling!r}")
        layers: list[nn.Module] = [nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, base_channels, 7),
                                                 _norm(base_channels), nn.ReLU(True))]
        ch = base_channels
        for _ in range(num_downsamplings):
            layers.append(nn.Sequential(nn.Conv2d(ch, ch * 2, 3, stride=2, padding=1), _norm(ch * 2), nn.ReLU(True)))
            ch *= 2
        layers += [_ResidualBlock(ch) for _ in range(num_residual_blocks)]
        self.encoder = nn.ModuleList(layers)
        up: list[nn.Module] = []
        for _ in range(num_downsamplings):
            if upsampling == "transposed":
                up.append(nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1))
            else:
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1), nn.Conv2d(ch, ch // 2, 3)]
            up += [_norm(ch // 2), nn.ReLU(True)]
            ch //= 2
        up += [nn.ReflectionPad2d(3), nn.Conv2d(ch, 3, 7)]
        self.decoder = nn.Sequential(*up)
        depth = 1 + num_downsamplings + num_residual_blocks
        if not nce_layers or max(nce_layers) > depth or min(nce_layers) < 0:
            raise ValueError(f"nce_layers: expected indices in 0..{depth}, got {tuple(nce_layers)}")

    @property
    def factor(self) -> int:
        return 2 ** self.config.num_downsamplings

    def encode_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the input (index 0, mapped to [-1, 1]) and the output of every encoder layer."""
        h = x * 2 - 1
        feats = [h]
        for layer in self.encoder:
            h = layer(h)
            feats.append(h)
        return feats

    def nce_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return the feature maps PatchNCE compares (``config.nce_layers``)."""
        feats = self.encode_layers(x)
        return [feats[i] for i in self.config.nce_layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"images: expected height and width divisible by {f}, got {x.shape[-2]}x{x.shape[-1]}")
        return torch.sigmoid(self.decoder(self.encode_layers(x)[-1]))


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """PatchGAN critic (70×70 receptive field at 3 layers): one logit per overlapping patch.

    Shape:
        ``(B,3,H,W)`` in [0, 1] -> ``(B,1,h,w)`` logits.
    """

    @register_to_config
    def __init__(self, base_channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = base_channels
        for i in range(1, num_layers + 1):
            nxt = base_channels * min(2**i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2 if i < num_layers else 1, 1), _norm(nxt), nn.LeakyReLU(0.2, True)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class PatchSampler(ModelMixin, ConfigMixin):
    """Sample patch locations and project them (one 2-layer MLP per feature layer).

    Args:
        in_channels: channels of each NCE feature layer.
        projection_dim: output dimension of the MLPs.

    Example:
        >>> s = PatchSampler(in_channels=(3, 8))
        >>> feats = [torch.randn(2, 3, 16, 16), torch.randn(2, 8, 8, 8)]
        >>> q, ids = s(feats, num_patches=10)
        >>> q[1].shape, len(ids)
        (torch.Size([2, 10, 64]), 2)
    """

    @register_to_config
    def __init__(self, in_channels: tuple[int, ...] = (3, 32, 64, 128), projection_dim: int = 64) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, projection_dim), nn.ReLU(True), nn.Linear(projection_dim, projection_dim))
            for c in in_channels
        )

    def forward(self, features: list[torch.Tensor], num_patches: int = 128,
                patch_ids: list[torch.Tensor] | None = None,
                generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Project ``num_patches`` locations of each layer (the same ``patch_ids`` when given).

        Returns:
            ``(projected, ids)``: per layer ``(B,N,D)`` L2-normalized features and the ``(N,)``
            flat location indices used (pass them back to sample the key image alike).
        """
        if len(features) != len(self.mlps):
            raise ValueError(f"features: expected {len(self.mlps)} layers, got {len(features)}")
        out, ids = [], []
        for i, (feat, mlp) in enumerate(zip(features, self.mlps, strict=True)):
            flat = feat.flatten(2).transpose(1, 2)  # (B,HW,C)
            if patch_ids is not None:
                idx = patch_ids[i]
            else:
                idx = torch.randperm(flat.shape[1], generator=generator)[: min(num_patches, flat.shape[1])]
            idx = idx.to(flat.device)
            out.append(F.normalize(mlp(flat[:, idx]), dim=-1))
            ids.append(idx)
        return out, ids
