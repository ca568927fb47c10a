"""Published weight layouts that are not timm's own: transformers' DINOv2 (Phikon-v2) and CONCH v1.5.

* :func:`dinov2_to_timm` renames a transformers ``Dinov2Model`` state dict (``embeddings.*``,
  ``encoder.layer.N.*``, ``layernorm.*``) onto timm's ``VisionTransformer`` keys, concatenating
  ``query``/``key``/``value`` into ``qkv``. The two forwards are the same network (pre-norm
  blocks, layer scale, exact GELU, CLS token after the final LayerNorm), so no transformers
  install is needed; ``embeddings.mask_token`` (masked-image training only) is checked and dropped.
* :class:`ConchVisionTower` is CONCH v1.5's vision tower as TRIDENT loads it
  (``trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py``): an iBOT-style ViT-L/16
  (``trunk.*``, timm's key names, layer scale 1.0, built for 224 px) whose position embedding is
  resampled bilinearly to the 14×14 grid at load time and bicubically, with iBOT's ``+0.1``
  scale factor, to the input's grid at every forward; then an attentional pooler with one query
  (``attn_pool_contrast.*``) and a LayerNorm (``ln_contrast``): a 768-D embedding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_DINOV2_RENAMES = [  # timm key pattern -> transformers Dinov2Model key
    (r"cls_token", "embeddings.cls_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
]
_QKV = r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"
_DINOV2_EXTRA = ("embeddings.mask_token",)


def _dinov2_sources(timm_key: str) -> list[str]:
    """Return the transformers keys that make up one timm key (three for ``qkv``)."""
    match = re.fullmatch(_QKV, timm_key)
    if match:
        block, kind = match.groups()
        return [f"encoder.layer.{block}.attention.attention.{part}.{kind}" for part in ("query", "key", "value")]
    for pattern, template in _DINOV2_RENAMES:
        if re.fullmatch(pattern, timm_key):
            return [re.sub(f"^{pattern}$", template, timm_key)]
    raise ValueError(f"model: expected a ViT key with a Dinov2Model counterpart, got {timm_key!r}")


def dinov2_to_timm(state: Mapping[str, torch.Tensor], timm_keys: list[str], path: str | Path,
                   argument: str = "checkpoint_path") -> dict[str, torch.Tensor]:
    """Convert a transformers ``Dinov2Model`` state dict to the timm keys ``timm_keys``.

    Raises:
        ValueError: keys missing from or unexpected in the Dinov2Model layout (a few are listed).
    """
    sources = {key: _dinov2_sources(key) for key in timm_keys}
    expected = {s for keys in sources.values() for s in keys} | set(_DINOV2_EXTRA)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{argument}: expected the transformers Dinov2Model keys, got {len(missing)} missing {missing[:4]} and "
            f"{len(unexpected)} unexpected {unexpected[:4]} in {path} (another model, or architecture overrides "
            "that do not match it)")
    return {key: torch.cat([state[s] for s in keys]) if len(keys) > 1 else state[keys[0]]
            for key, keys in sources.items()}


def ibot_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Resample like iBOT's ``interpolate_pos_encoding``: CLS entry kept, the square grid bicubically.

    Unchanged when the grid matches (and is square); otherwise ``F.interpolate`` with
    ``scale_factor=((grid+0.1)/side)`` exactly as iBOT/CONCH v1.5 call it.
    """
    count = pos_embed.shape[1] - 1
    if grid_h * grid_w == count and grid_h == grid_w:
        return pos_embed
    side, dim = int(math.sqrt(count)), pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if tuple(grid.shape[-2:]) != (grid_h, grid_w):
        raise ValueError(f"images: expected a grid iBOT's interpolation reaches, got {grid_h}x{grid_w}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _ibot_vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    class IBOTVisionTransformer(VisionTransformer):
        """timm's ViT with iBOT's position-embedding interpolation (CLS token, no registers)."""

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            batch, grid_h, grid_w, dim = x.shape  # dynamic_img_size: patch tokens come as NHWC
            x = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
            return self.pos_drop(x + ibot_pos_embed(self.pos_embed, grid_h, grid_w))

    return IBOTVisionTransformer


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH uses it: learned queries attend over LayerNormed tokens.

    Shape:
        tokens ``(B,N,context_dim)`` → ``(B,n_queries,d_model)``.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        x = self.ln_k(tokens)
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(x).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)

        sim = heads(q) * self.scale @ heads(k).transpose(-2, -1)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ heads(v)).transpose(1, 2).reshape(batch, q.shape[1], -1)
        return self.to_out(out)


class ConchVisionTower(nn.Module):
    """CONCH v1.5's vision tower (keys ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).

    Args:
        pool_dim: the pooler's width (768), the embedding dimension.
        pool_heads: the pooler's heads (8).
        **trunk_kwargs: timm ``VisionTransformer`` arguments of the iBOT ViT-L/16 trunk.
    """

    def __init__(self, pool_dim: int = 768, pool_heads: int = 8, **trunk_kwargs) -> None:
        super().__init__()
        self.trunk = _ibot_vit_class()(**{**trunk_kwargs, "dynamic_img_size": True})
        self.attn_pool_contrast = AttentionalPooler(pool_dim, self.trunk.embed_dim, pool_heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.num_features = pool_dim

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(pixels))[:, 0])

    def fit_pos_embed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample ``trunk.pos_embed`` to the trunk's grid as CONCH v1.5's loader does (bilinear, no antialias)."""
        from timm.layers import resample_abs_pos_embed

        pos = state.get("trunk.pos_embed")
        if pos is not None and pos.ndim == 3 and pos.shape != self.trunk.pos_embed.shape:
            side = math.isqrt(pos.shape[1] - 1)
            if side * side != pos.shape[1] - 1 or pos.shape[-1] != self.trunk.embed_dim:
                return state  # not a square grid of this width: load_strict reports the shape
            state = {**state, "trunk.pos_embed": resample_abs_pos_embed(
                pos, new_size=list(self.trunk.patch_embed.grid_size), num_prefix_tokens=1,
                interpolation="bilinear", antialias=False)}
        return state
