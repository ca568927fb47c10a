"""Target stain style → cross-attention tokens, from the reference's VAE latents (StainFuser-style).

The style of a reference is what its tissue looks like, wherever it is: the tokenizer therefore
sees the reference as an unordered *set* of latent cells (no positions) plus one pooled token of
tissue-weighted latent statistics. Each cell carries its tissue weight, and when a reference has
more cells than ``max_tokens`` the most tissue-rich are kept (deterministically), so background
in a target does not dilute its style and large or several targets cost a bounded number of
tokens.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def latent_cells(latents: torch.Tensor, tissue: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten latents and a tissue map into cells and weights.

    Shape:
        latents ``(B,C,h,w)``, tissue ``(B,1,h,w)`` (or ``(B,h,w)``) in [0, 1] ->
        cells ``(B,h*w,C)``, weights ``(B,h*w)``.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents: expected (B,C,h,w), got {tuple(latents.shape)}")
    weights = tissue.reshape(latents.shape[0], -1).to(latents)
    if weights.shape[1] != latents.shape[2] * latents.shape[3]:
        raise ValueError(f"tissue: expected {tuple(latents.shape[-2:])} cells per image, got {tuple(tissue.shape)}")
    return latents.flatten(2).transpose(1, 2), weights


class StyleTokenizer(ModelMixin, ConfigMixin):
    """Map reference latent cells ``(B,M,C)`` with tissue weights ``(B,M)`` to tokens ``(B,1+N,D)``.

    Args:
        latent_channels: ``C`` of the VAE.
        cross_attention_dim: ``D`` of the UNet's cross-attention.
        hidden_dim: MLP width.
        max_tokens: ``N``, the most cells kept (by tissue weight).

    Example:
        >>> tok = StyleTokenizer(latent_channels=4, cross_attention_dim=8, max_tokens=16)
        >>> tok(torch.randn(2, 64, 4), torch.rand(2, 64)).shape
        torch.Size([2, 17, 8])
    """

    @register_to_config
    def __init__(
        self, latent_channels: int = 4, cross_attention_dim: int = 128, hidden_dim: int = 128, max_tokens: int = 256
    ) -> None:
        super().__init__()
        c, d = latent_channels, cross_attention_dim
        self.cell = nn.Sequential(nn.Linear(c + 1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, d))
        self.pooled = nn.Sequential(nn.Linear(2 * c, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, d))
        self.norm = nn.LayerNorm(d)

    def check_cells(self, cells: torch.Tensor, weights: torch.Tensor) -> None:
        """Raise a ``ValueError`` for wrong shapes or non-finite values."""
        c = self.config.latent_channels
        if cells.ndim != 3 or cells.shape[-1] != c:
            raise ValueError(f"cells: expected (B,M,{c}) latent cells, got {tuple(cells.shape)}")
        if weights.shape != cells.shape[:2]:
            raise ValueError(f"weights: expected shape {tuple(cells.shape[:2])}, got {tuple(weights.shape)}")
        if not torch.isfinite(cells).all():
            raise ValueError("cells: expected finite latents, got NaN or inf")

    def select(self, cells: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the ``max_tokens`` most tissue-rich cells (stable order; all cells when fewer)."""
        n = self.config.max_tokens
        if cells.shape[1] <= n:
            return cells, weights
        order = torch.argsort(weights, dim=1, descending=True, stable=True)[:, :n]
        return cells.gather(1, order[..., None].expand(-1, -1, cells.shape[-1])), weights.gather(1, order)

    def forward(self, cells: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Tokens: one pooled-statistics token, then one token per kept cell."""
        self.check_cells(cells, weights)
        w = weights.clamp(0, 1)
        norm = w.sum(1, keepdim=True).clamp(min=1e-3)
        mean = (cells * w[..., None]).sum(1) / norm
        std = (((cells - mean[:, None]) ** 2 * w[..., None]).sum(1) / norm).clamp(min=1e-6).sqrt()
        pooled = self.pooled(torch.cat([mean, std], -1))[:, None]
        kept, kept_w = self.select(cells, w)
        tokens = self.cell(torch.cat([kept, kept_w[..., None]], -1))
        return self.norm(torch.cat([pooled, tokens], 1))
