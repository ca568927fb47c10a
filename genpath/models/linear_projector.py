"""SSL embeddings → cross-attention tokens through one ``Linear`` per token (Graikos et al.'s conditioners).

Graikos et al. (CVPR 2024, ``cvlab-stonybrook/Large-Image-Diffusion``,
``ldm/modules/encoders/modules.py``) condition a latent diffusion UNet on self-supervised
embeddings without an MLP: ``PatchEmbedder`` L2-normalises one embedding and maps it with one
``nn.Linear`` to one token; ``SSLEmbedder`` does the same for a patch and a region embedding
(two tokens). Their datasets train the unconditional model by replacing an embedding with zeros
(``p_uncond``), and their notebooks guide with zero embeddings, so the null token of each
``Linear`` is its bias (``F.normalize`` keeps a zero vector zero).

:class:`LinearEmbeddingProjector` is that conditioner with the interface of
:class:`~genpath.models.conditioning.EmbeddingProjector` (``check_embeddings``, ``forward``,
``null_tokens``, ``config.cross_attention_dim``), so
:class:`~genpath.pipelines.EmbeddingToImagePipeline` runs it unchanged.

Example:
    >>> proj = LinearEmbeddingProjector(embed_dims=(6, 4), cross_attention_dim=8)
    >>> proj(torch.randn(3, 10)).shape
    torch.Size([3, 2, 8])
    >>> bool(torch.equal(proj(torch.zeros(1, 10))[0], proj.null_tokens(1)[0]))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class LinearEmbeddingProjector(ModelMixin, ConfigMixin):
    """Map SSL embeddings ``(B, sum(embed_dims))`` to ``len(embed_dims)`` tokens ``(B,T,C)``, one ``Linear`` each.

    The input holds the embeddings side by side, in the order of ``embed_dims`` (Graikos et
    al.'s ``SSLEmbedder``: patch, then region). When there are several, an input holding only
    the first (``(B, embed_dims[0])``) is accepted and the others are zeros, as ``SSLEmbedder``
    does when the region embedding is missing.

    Args:
        embed_dims: the width of each embedding (``patch_embed_dim``, ``region_embed_dim``).
        cross_attention_dim: ``C`` of the UNet's cross-attention (their ``target_dim`` / 512).
        normalize: L2-normalise each embedding before its ``Linear`` (their ``normalize_ssl``).
    """

    @register_to_config
    def __init__(self, embed_dims: tuple[int, ...] = (768,), cross_attention_dim: int = 512,
                 normalize: bool = True) -> None:
        super().__init__()
        if not embed_dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in embed_dims):
            raise ValueError(f"embed_dims: expected one or more positive integers, got {embed_dims!r}")
        self.linears = nn.ModuleList(nn.Linear(d, cross_attention_dim) for d in embed_dims)

    @property
    def accepted_widths(self) -> tuple[int, ...]:
        """Input widths :meth:`forward` takes: all embeddings, or only the first."""
        dims = tuple(self.config.embed_dims)
        return (sum(dims),) if len(dims) == 1 else (sum(dims), dims[0])

    def check_embeddings(self, embeddings: torch.Tensor, name: str = "embeddings") -> None:
        """Raise a ``ValueError`` naming ``name`` for a wrong shape or non-finite values."""
        widths = self.accepted_widths
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or embeddings.shape[1] not in widths:
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            wanted = " or ".join(f"(B,{w})" for w in widths)
            raise ValueError(f"{name}: expected a {wanted} tensor of encoder embeddings, got {got}")
        if not torch.isfinite(embeddings).all():
            raise ValueError(f"{name}: expected finite embeddings, got NaN or inf")

    def forward(self, embeddings: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens ``(B,T,C)``; rows where ``drop`` is True get the null tokens (condition dropout)."""
        dims = list(self.config.embed_dims)
        x = embeddings.to(self.dtype)
        if x.shape[1] != sum(dims):  # only the first embedding given: the others are zeros
            x = torch.cat([x, x.new_zeros(x.shape[0], sum(dims) - x.shape[1])], dim=1)
        parts = torch.split(x, dims, dim=1)
        if self.config.normalize:
            parts = [F.normalize(p, dim=-1) for p in parts]
        tokens = torch.stack([linear(p) for linear, p in zip(self.linears, parts, strict=True)], dim=1)
        if drop is not None:
            tokens = torch.where(drop.view(-1, 1, 1), self.null_tokens(tokens.shape[0]).to(tokens), tokens)
        return tokens

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """Return the unconditional tokens ``(B,T,C)``: each ``Linear``'s bias (its output for a zero embedding)."""
        return torch.stack([linear.bias for linear in self.linears]).expand(batch_size, -1, -1)
