"""The published CycleGAN / pix2pix / CUT / ASP ``ResnetGenerator``, key for key, as a genpath module.

:class:`ResnetGenerator` rebuilds the generator of junyanz/pytorch-CycleGAN-and-pix2pix
(``models/networks.py``), which BCI's PyramidPix2pix (bupt-ai-cz/BCI) copies unchanged, and
its CUT variant (taesungp/contrastive-unpaired-translation), which ASP
(lifangda01/AdaptiveSupervisedPatchNCE) extends with spectral norm. One ``nn.Sequential``
called ``model`` holds, in the published order (so a published state dict's ``model.N.*``
keys load as they are):

* stem: ``ReflectionPad2d(3)``, ``Conv2d(3, ngf, 7)``, norm, ReLU;
* ``n_downsampling`` stages: ``Conv2d(c, 2c, 3, stride=2)``, norm, ReLU — or, anti-aliased
  (CUT's default), ``Conv2d(c, 2c, 3, stride=1)``, norm, ReLU, :class:`Downsample` (a fixed
  3×3 binomial blur, buffer ``filt``, then stride 2);
* ``n_blocks`` :class:`ResnetBlock` (``conv_block``: pad, conv, norm, ReLU, [``Dropout(0.5)``],
  pad, conv, norm; the dropout shifts the second conv from index 5 to 6);
* ``n_downsampling`` stages: ``ConvTranspose2d(c, c/2, 3, stride=2)``, norm, ReLU — or,
  anti-aliased, :class:`Upsample` (a fixed 4×4 binomial transposed blur, buffer ``filt``),
  ``Conv2d(c, c/2, 3, padding=1)``, norm, ReLU;
* head: ``ReflectionPad2d(3)``, ``Conv2d(ngf, 3, 7)``, ``Tanh``.

Convolutions carry a bias only with instance norm (``use_bias``), as published (the head
always has one). Norms: ``batch`` (``BatchNorm2d``, affine, running statistics), ``instance``
(``InstanceNorm2d`` without affine or running statistics) or ``none``.

The published forward maps ``[-1, 1]`` to ``[-1, 1]`` (``self.model``); :meth:`ResnetGenerator.forward`
maps genpath's ``[0, 1]`` to ``[0, 1]`` around it. ``batch_stats=True`` normalizes every image
with its own statistics in the batch-norm layers (BCI's ``test.py`` runs the generator in train
mode with batch size 1, so its batch norms use each image's statistics); running statistics
are never updated. Dropout is never applied at inference (the module is in eval mode).

Example:
    >>> g = ResnetGenerator(ngf=4, n_blocks=1).eval()
    >>> g(torch.rand(1, 3, 16, 16)).shape
    torch.Size([1, 3, 16, 16])
    >>> sorted(k for k in g.state_dict() if k.startswith("model.10."))[:2]
    ['model.10.conv_block.1.bias', 'model.10.conv_block.1.weight']
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NORMS = ("batch", "instance", "none")


def binomial_filter(size: int) -> torch.Tensor:
    """Return the normalized ``size``×``size`` binomial blur of CUT's anti-aliasing (``get_filter``).

    Example:
        >>> binomial_filter(3)
        tensor([[0.0625, 0.1250, 0.0625],
                [0.1250, 0.2500, 0.1250],
                [0.0625, 0.1250, 0.0625]])
    """
    if not 1 <= size <= 7:
        raise ValueError(f"size: expected a filter size in 1..7, got {size}")
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


class Downsample(nn.Module):
    """Blur then subsample by 2 (CUT's ``Downsample``: reflect pad 1, 3×3 binomial, stride 2, per channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", binomial_filter(3)[None, None].repeat(channels, 1, 1, 1))
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad(x), self.filt, stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Upsample by 2 with a fixed blur (CUT's ``Upsample``: replicate pad 1, 4×4 binomial ×4, transposed stride 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", (binomial_filter(4) * 4)[None, None].repeat(channels, 1, 1, 1))
        self.pad = nn.ReplicationPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv_transpose2d(self.pad(x), self.filt, stride=2, padding=2, groups=x.shape[1])
        return out[:, :, 1:-1, 1:-1]  # the published [1:, 1:] then [:-1, :-1] (even filter size)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same state dict) that can normalize each image with its own statistics.

    With ``per_image=True`` the output equals a batch norm in train mode called on one image at
    a time (BCI's test behaviour), whatever the batch size; running statistics stay untouched.
    """

    def __init__(self, channels: int, per_image: bool = False) -> None:
        super().__init__(channels, affine=True, track_running_stats=True)
        self.per_image = per_image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)
        return super().forward(x)


def _norm(kind: str, channels: int, per_image: bool) -> nn.Module:
    if kind == "batch":
        return BatchNorm2d(channels, per_image)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()


class ResnetBlock(nn.Module):
    """The published residual block: ``x + conv_block(x)`` (reflect padding)."""

    def __init__(self, dim: int, norm: str, use_dropout: bool, use_bias: bool, per_image: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias),
                                   _norm(norm, dim, per_image), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=use_bias), _norm(norm, dim, per_image)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(ModelMixin, ConfigMixin):
    """The published ResNet generator (pix2pix / CycleGAN / CUT / ASP / BCI layouts), images in [0, 1].

    Args:
        ngf: width of the stem (``--ngf``; doubles at each downsampling).
        n_blocks: residual blocks (``resnet_9blocks`` = 9, ``resnet_6blocks`` = 6).
        n_downsampling: stride-2 stages (2 in every published model; ASP reads it from ``opt``).
        norm: ``"batch"``, ``"instance"`` or ``"none"`` (``--norm`` / ``--normG``).
        use_dropout: ``Dropout(0.5)`` inside each block (pix2pix/BCI default; shifts key indices).
        antialias_down: CUT's blurred downsampling (CUT/ASP default; off with ``--no_antialias``).
        antialias_up: CUT's blurred upsampling (CUT/ASP default; off with ``--no_antialias_up``).
        batch_stats: batch-norm layers use each image's own statistics (BCI's test behaviour).

    Shape:
        ``(B,3,H,W)`` float in [0, 1] -> ``(B,3,H,W)`` float in [0, 1]; ``H`` and ``W`` divisible
        by :attr:`factor`.
    """

    @register_to_config
    def __init__(self, ngf: int = 64, n_blocks: int = 9, n_downsampling: int = 2, norm: str = "instance",
                 use_dropout: bool = False, antialias_down: bool = False, antialias_up: bool = False,
                 batch_stats: bool = False) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
        for name, value, least in (("ngf", ngf, 1), ("n_blocks", n_blocks, 0), ("n_downsampling", n_downsampling, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if batch_stats and norm != "batch":
            raise ValueError(f"batch_stats: expected a batch-norm generator, got norm {norm!r}")
        per_image = bool(batch_stats)
        use_bias = norm == "instance"
        model: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7, bias=use_bias),
                                  _norm(norm, ngf, per_image), nn.ReLU(True)]
        for i in range(n_downsampling):
            c = ngf * 2**i
            if antialias_down:
                model += [nn.Conv2d(c, 2 * c, 3, stride=1, padding=1, bias=use_bias), _norm(norm, 2 * c, per_image),
                          nn.ReLU(True), Downsample(2 * c)]
            else:
                model += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=use_bias), _norm(norm, 2 * c, per_image),
                          nn.ReLU(True)]
        width = ngf * 2**n_downsampling
        model += [ResnetBlock(width, norm, use_dropout, use_bias, per_image) for _ in range(n_blocks)]
        for i in range(n_downsampling):
            c = ngf * 2 ** (n_downsampling - i)
            if antialias_up:
                model += [Upsample(c), nn.Conv2d(c, c // 2, 3, stride=1, padding=1, bias=use_bias)]
            else:
                model += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=use_bias)]
            model += [_norm(norm, c // 2, per_image), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
        self.model = nn.Sequential(*model)

    @property
    def factor(self) -> int:
        """Input sides must be multiples of this (``2 ** n_downsampling``)."""
        return 2 ** self.config.n_downsampling

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Translate float images in [0, 1] (the published ``[-1, 1]`` convention inside).

        Raises:
            ValueError: a side is not divisible by :attr:`factor`.
        """
        f = self.factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"images: expected height and width divisible by {f}, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        return (self.model(images * 2 - 1) + 1) / 2
