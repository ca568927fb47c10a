"""HistAug: predict the embedding of a transformed patch from its clean embedding and the transform's params.

Reference design (Boutaj et al., "Controllable Latent Space Augmentation for Digital
Pathology"): split the embedding into chunk tokens, embed each transform parameter as a token
(a learned table for discrete ones, an MLP for continuous ones), let chunk tokens cross-attend
to the transform tokens, and predict the augmented embedding with a residual.

genpath's changes, each for a stated reason:

1. Chunk tokens also self-attend (before the cross-attention in every block): a transform moves
   a feature chunk in a way that depends on the rest of the embedding (e.g. a hue shift matters
   more for an eosin-rich patch), which per-chunk cross-attention alone cannot see.
2. Embeddings are standardized with per-dimension statistics stored as buffers
   (:meth:`fit_statistics`), so one architecture works for encoders of any scale.
3. The output layer is zero-initialised: an untrained model *is* the identity baseline, and
   training can only move away from it where that lowers the loss.
4. Continuous params are normalized by their training range before the MLP, so all transform
   tokens start on the same scale.
5. Params with a leading dimension of 1 (one draw for a whole slide) are embedded once and
   broadcast: a bag of any size costs one token computation.

Params follow :mod:`augment.params` (the same dict :class:`augment.histology.RandomHistologyTransform`
applies to images), drawn by :meth:`HistAugModel.sample_params`.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from augment.params import PARAM_SCHEMA, check_param_ranges
from augment.sampling import TRANSFORM_KEYS, AugmentationSampler


class _Attention(nn.Module):
    """Multi-head attention whose keys/values may have a leading size of 1 (broadcast, computed once)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_dim {dim}, got {heads}")
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m, n, d = x.shape
        q = self.q(x).reshape(m, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(len(context), -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if len(context) != m:
            k, v = k.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(m, n, d))


class _Block(nn.Module):
    """Pre-norm self-attention over chunk tokens, cross-attention to transform tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn, self.cross_attn = _Attention(dim, heads), _Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), cond)
        return x + self.mlp(self.norm3(x))


class HistAugModel(ModelMixin, ConfigMixin):
    """Feature-space augmentation conditioned on explicit transform params.

    Args:
        embed_dim: ``D`` of the encoder whose embeddings it augments.
        num_chunks: number of chunk tokens the embedding is split into (zero-padded to a multiple).
        hidden_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width factor.
        transforms: transform names (:data:`augment.sampling.TRANSFORM_KEYS`) it was trained on.
        ranges: the sampler's (low, high) per continuous key (overrides of the defaults).
        max_radius: the sampler's largest morphology radius.
        p_each: the sampler's probability that each transform is on.

    Shape:
        embeddings ``(N,D)`` with params of leading size ``N`` or 1, or bags ``(B,N,D)`` with
        params of leading size ``B`` or 1 -> same shape as the embeddings.

    Example:
        >>> model = HistAugModel(embed_dim=32, num_chunks=4, hidden_dim=16, depth=1, num_heads=2)
        >>> params = model.sample_params(5, mode="wsi", generator=torch.Generator().manual_seed(0))
        >>> model(torch.randn(5, 32), params).shape
        torch.Size([5, 32])
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int = 128,
        num_chunks: int = 8,
        hidden_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        transforms: list[str] | None = None,
        ranges: dict[str, list[float]] | None = None,
        max_radius: int = 2,
        p_each: float = 0.5,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_chunks < 1 or num_chunks > embed_dim:
            raise ValueError(f"num_chunks: expected 1..embed_dim ({embed_dim}), got {num_chunks}")
        self.sampler = AugmentationSampler(list(transforms or TRANSFORM_KEYS), dict(ranges or {}), max_radius,
                                           p_each)
        self.keys = self.sampler.keys
        self.chunk = math.ceil(embed_dim / num_chunks)
        self.chunk_in = nn.Linear(self.chunk, hidden_dim)
        self.chunk_pos = nn.Parameter(torch.randn(num_chunks, hidden_dim) * 0.02)
        self.key_embed = nn.Parameter(torch.randn(len(self.keys), hidden_dim) * 0.02)
        self.param_embed = nn.ModuleDict()
        for key in self.keys:
            spec = PARAM_SCHEMA[key]
            if spec.discrete:
                self.param_embed[key] = nn.Embedding(spec.num_values, hidden_dim)
            else:
                self.param_embed[key] = nn.Sequential(nn.Linear(math.prod(spec.shape), hidden_dim), nn.SiLU(),
                                                      nn.Linear(hidden_dim, hidden_dim))
        self.blocks = nn.ModuleList(_Block(hidden_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out = nn.Linear(hidden_dim, self.chunk)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("embed_mean", torch.zeros(embed_dim))
        self.register_buffer("embed_std", torch.ones(embed_dim))

    # -- params --------------------------------------------------------------------------------

    def sample_params(
        self, n: int, mode: str = "wsi", generator: torch.Generator | None = None, strength: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """Draw params for ``n`` patches: ``"wsi"`` (one draw for all, the default) or ``"patch"``."""
        return self.sampler.sample(n, mode=mode, generator=generator, strength=strength)

    def check_params(self, params: dict[str, torch.Tensor], n: int) -> None:
        """Check keys (exactly the model's), shapes (leading ``n`` or 1), finiteness and documented ranges."""
        if not isinstance(params, dict):
            raise TypeError(f"params: expected a dict of tensors, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self.keys) - {"batch_prob", "forward_input_shape"})
        missing = sorted(set(self.keys) - set(params))
        if unknown or missing:
            raise KeyError(f"params: expected keys {list(self.keys)}, got unknown {unknown} and missing {missing}")
        for key in self.keys:
            value, shape = params[key], PARAM_SCHEMA[key].shape
            if not isinstance(value, torch.Tensor) or tuple(value.shape[1:]) != shape or value.shape[0] not in (1, n):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"params[{key!r}]: expected shape ({n} or 1, *{shape}), got {got}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"params[{key!r}]: expected finite values, got NaN or inf")
        check_param_ranges(params, self.keys)

    def _param_tokens(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, key in enumerate(self.keys):
            spec = PARAM_SCHEMA[key]
            value = params[key].to(self.key_embed.device, torch.float32)
            if spec.discrete:
                tok = self.param_embed[key]((value - spec.low).round().long())
            else:
                low, high = self.sampler.ranges[key]
                half = max(abs(low - spec.identity), abs(high - spec.identity), 1e-6)
                tok = self.param_embed[key](((value - spec.identity) / half).reshape(len(value), -1))
            tokens.append(tok + self.key_embed[i])
        return torch.stack(tokens, 1)  # (M, P, H)

    # -- forward -------------------------------------------------------------------------------

    def fit_statistics(self, embeddings: torch.Tensor) -> HistAugModel:
        """Store per-dimension mean and std of clean training embeddings ``(N,D)``; returns self."""
        embeddings = self._check_embeddings(embeddings)
        self.embed_mean.copy_(embeddings.double().mean(0).float())
        self.embed_std.copy_(embeddings.double().std(0).float().clamp(min=1e-6))
        return self

    def _check_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        d = self.config.embed_dim
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim not in (2, 3) or embeddings.shape[-1] != d:
            got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
            raise ValueError(f"embeddings: expected (N,{d}) or (B,N,{d}) for this model, got {got}")
        if not embeddings.is_floating_point() or not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings: expected finite floating-point values, got NaN/inf or an integer dtype")
        return embeddings

    def forward(self, embeddings: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predict the augmented embeddings (same shape, dtype and device as ``embeddings``)."""
        x = self._check_embeddings(embeddings)
        groups = x.shape[0]  # patches for (N,D), bags for (B,N,D): params are per group
        self.check_params(params, groups)
        dtype = x.dtype
        flat = x.reshape(-1, x.shape[-1]).to(self.embed_mean.device, torch.float32)
        z = (flat - self.embed_mean) / self.embed_std
        pad = self.chunk * self.config.num_chunks - z.shape[1]
        chunks = torch.nn.functional.pad(z, (0, pad)).reshape(len(z), self.config.num_chunks, self.chunk)
        h = self.chunk_in(chunks) + self.chunk_pos
        shared = all(params[k].shape[0] == 1 for k in self.keys)
        cond = self._param_tokens({k: params[k][:1] if shared else params[k] for k in self.keys})
        if not shared and x.ndim == 3:
            cond = cond.repeat_interleave(x.shape[1], 0)  # one draw per bag, shared by its patches
        for block in self.blocks:
            h = block(h, cond)
        delta = self.out(self.out_norm(h)).reshape(len(z), -1)[:, : z.shape[1]]
        out = (z + delta) * self.embed_std + self.embed_mean
        return out.to(embeddings.device, dtype).reshape(embeddings.shape)
