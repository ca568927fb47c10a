"""Embedding → cross-attention tokens, with a learned null embedding for classifier-free guidance."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class EmbeddingProjector(ModelMixin, ConfigMixin):
    """Map SSL embeddings ``(B,D)`` to ``num_tokens`` cross-attention tokens ``(B,T,C)``.

    The embedding is layer-normalized (encoders differ in scale), passed through an MLP and split
    into tokens, each with a learned position offset. :meth:`null_tokens` gives the unconditional
    tokens used for condition dropout in training and for classifier-free guidance.

    Args:
        embed_dim: ``D`` of the conditioning encoder.
        cross_attention_dim: ``C`` of the UNet's cross-attention.
        num_tokens: ``T``.
        hidden_dim: MLP width.

    Example:
        >>> proj = EmbeddingProjector(embed_dim=16, cross_attention_dim=8, num_tokens=2)
        >>> proj(torch.randn(3, 16)).shape
        torch.Size([3, 2, 8])
    """

    @register_to_config
    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int = 4, hidden_dim: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_tokens * cross_attention_dim),
        )
        self.positions = nn.Parameter(torch.zeros(num_tokens, cross_attention_dim))
        self.null = nn.Parameter(torch.zeros(num_tokens, cross_attention_dim))
        nn.init.normal_(self.null, std=0.02)

    def check_embeddings(self, embeddings: torch.Tensor, name: str = "embeddings") -> None:
        """Raise a ``ValueError`` naming ``name`` for a wrong shape or non-finite values."""
        d = self.config.embed_dim
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[1] != d:
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"{name}: expected a (B,{d}) tensor of encoder embeddings, got {got}")
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"{name}: expected finite embeddings, got NaN or inf")

    def forward(self, embeddings: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(B,T,C)``; rows where ``drop`` is True get the null tokens (condition dropout)."""
        b = embeddings.shape[0]
        tokens = self.mlp(self.norm(embeddings.to(self.dtype))).view(b, self.config.num_tokens, -1) + self.positions
        if drop is not None:
            tokens = torch.where(drop.view(b, 1, 1), self.null.expand_as(tokens), tokens)
        return tokens

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        return self.null.expand(batch_size, -1, -1)
