"""Paired image metrics: SSIM, PSNR (kornia) and LPIPS (the ``lpips`` package, when its weights exist).

All take RGB images under genpath's tensor contract (uint8 or float in [0, 1], ``(B,3,H,W)``
or ``(3,H,W)``) and return one value per image pair, ``(B,)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genpath.image_tensor import to_float_batch

#: torchvision backbone files LPIPS needs in the torch hub cache (it cannot download here).
LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed on this machine (e.g. missing weights); never substituted."""


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = to_float_batch(a, "a")
    y, _ = to_float_batch(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"b: expected the shape of a {tuple(x.shape)}, got {tuple(y.shape)}")
    return x.float(), y.float().to(x.device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per pair (data range 1); identical images give ``inf``.

    Example:
        >>> x = torch.zeros(1, 3, 8, 8); psnr(x, x + 0.1).round()
        tensor([20.])
    """
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Mean structural similarity per pair (kornia's Gaussian-window SSIM, data range 1)."""
    from genpath.utils.quiet_imports import import_kornia

    import_kornia()
    from kornia.metrics import ssim as kornia_ssim

    x, y = _pair(a, b)
    return kornia_ssim(x, y, window_size, max_val=1.0).flatten(1).mean(1)


def lpips_available(net: str = "alex") -> bool:
    """Whether LPIPS can run: the package is importable and its torchvision backbone is cached."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]).is_file()


_LPIPS: dict[str, torch.nn.Module] = {}


def lpips_distance(a: torch.Tensor, b: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """LPIPS distance per pair through the ``lpips`` package.

    Raises:
        MetricUnavailableError: the backbone weights are not in the torch hub cache (no download
            is attempted and no other metric is substituted).
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"net: expected one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    if not lpips_available(net):
        raise MetricUnavailableError(
            f"LPIPS unavailable: expected {LPIPS_BACKBONES[net]} in {Path(torch.hub.get_dir()) / 'checkpoints'}"
        )
    import lpips

    if net not in _LPIPS:
        _LPIPS[net] = lpips.LPIPS(net=net, verbose=False).eval()
    x, y = _pair(a, b)
    with torch.no_grad():
        return _LPIPS[net].to(x.device)(x * 2 - 1, y * 2 - 1).flatten()
