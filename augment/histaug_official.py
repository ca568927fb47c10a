"""The official HistAug checkpoints (Boutaj et al., ICCV 2025), reimplemented in plain torch.

The published releases (``sofieneb/histaug-{conch,conch_v15,uni,virchow2,hoptimus1}``) are
transformers folders meant for ``AutoModel.from_pretrained(..., trust_remote_code=True)``:
``config.json`` (``model_type: "histaug"``) and ``model.safetensors`` whose keys start with
``histaug.``. :func:`load_official_histaug` reads such a folder without transformers and without
running any of its code, into :class:`OfficialHistAugModel`, a transcription of
``HistaugModel`` (MICS-Lab/HistAug, ``src/histaug/models/histaug_model.py``):

* the embedding ``(B, input_dim)`` is cut into ``chunk_size`` tokens of width
  ``E = input_dim / chunk_size`` plus fixed sine/cosine positions;
* every transform is one token (an embedding table for the discrete ones, a 1->2E->E SiLU MLP
  for the continuous ones) plus a token for its position in the order of application;
* ``depth`` blocks of pre-norm cross-attention (chunk tokens attend to the transform tokens,
  per-head LayerNorm on queries and keys) and an MLP;
* a final LayerNorm and a dense ``input_dim -> input_dim`` head (no residual).

``features_embed`` exists in the published weights but is unused by the published forward; it
is kept so that loading is strict. Parameters are the published dictionary ``{name: (value,
position)}`` (:data:`OFFICIAL_TRANSFORMS`); :func:`augment.histaug_translate.to_official_params`
translates genpath's schema into it where an equivalent exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from genpath.config import check_types

logger = logging.getLogger(__name__)

#: transform name -> number of values (discrete) or None (continuous scalar), as published.
OFFICIAL_TRANSFORMS: dict[str, int | None] = {
    "rotation": 4, "crop": 6, "h_flip": 2, "v_flip": 2, "gaussian_blur": 2, "erosion": 2, "dilation": 2,
    "brightness": None, "contrast": None, "saturation": None, "hue": None, "gamma": None, "hed": None,
}
#: the order in which the published ``sample_aug_params`` lists transforms missing from a config.
_SUPPORTED_ORDER = ("rotation", "crop", "h_flip", "v_flip", "gaussian_blur", "erosion", "dilation",
                    "brightness", "contrast", "saturation", "hue", "gamma", "hed")
_ACTIVATIONS = ("Identity", "ReLU", "GELU", "SiLU", "Tanh", "Sigmoid", "LeakyReLU", "ELU", "Softplus", "Mish")
_MODES = ("instance_wise", "wsi_wise")


@dataclass
class OfficialHistAugConfig:
    """The model keys of the published ``config.json`` (``HistaugConfig``), with its defaults.

    transformers leaves out keys equal to their defaults, so the defaults must be the published
    ones. ``chunk_size`` is the *number* of chunks; ``embedding_type`` is stored by the releases
    but unused by the published forward (only ``"linear"`` exists).
    """

    input_dim: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: float = 4.0
    use_transform_pos_embeddings: bool = True
    positional_encoding_type: str = "learnable"
    final_activation: str = "Identity"
    embedding_type: str = "linear"
    chunk_size: int = 16
    transforms: dict = field(default_factory=lambda: {"parameters": {}})

    def __post_init__(self) -> None:
        if self.input_dim < 1 or self.chunk_size < 1 or self.input_dim % self.chunk_size:
            raise ValueError(f"chunk_size: expected a divisor of input_dim {self.input_dim}, got {self.chunk_size}")
        width = self.input_dim // self.chunk_size
        if width % 2 or self.num_heads < 1 or width % self.num_heads:
            raise ValueError(f"num_heads: expected an even token width input_dim/chunk_size ({width}) divisible by "
                             f"num_heads, got num_heads {self.num_heads}")
        if self.depth < 0 or not self.mlp_ratio > 0:
            raise ValueError(f"depth, mlp_ratio: expected >= 0 and > 0, got {self.depth} and {self.mlp_ratio}")
        if self.positional_encoding_type not in ("learnable", "sinusoidal"):
            raise ValueError(f"positional_encoding_type: expected 'learnable' or 'sinusoidal', got "
                             f"{self.positional_encoding_type!r}")
        if self.final_activation not in _ACTIVATIONS:
            raise ValueError(f"final_activation: expected one of {list(_ACTIVATIONS)}, got {self.final_activation!r}")
        if self.embedding_type != "linear":
            raise ValueError(f"embedding_type: expected 'linear' (the only published value), got "
                             f"{self.embedding_type!r}")
        params = self.transforms.get("parameters") if isinstance(self.transforms, dict) else None
        if not isinstance(params, dict) or not params or set(params) - set(OFFICIAL_TRANSFORMS):
            got = sorted(params) if isinstance(params, dict) else self.transforms
            raise ValueError(f"transforms: expected {{'parameters': {{name: setting}}}} with names from "
                             f"{list(_SUPPORTED_ORDER)}, got {got}")
        for name, value in params.items():
            if OFFICIAL_TRANSFORMS[name] is not None:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
                want = "a probability in [0, 1]"
            else:
                ok = (isinstance(value, list | tuple) and len(value) == 2
                      and all(isinstance(v, int | float) and math.isfinite(v) for v in value) and value[0] <= value[1])
                want = "a range [low, high]"
            if not ok:
                raise ValueError(f"transforms.parameters.{name}: expected {want}, got {value!r}")


def _sinusoidal(num_positions: int, dim: int) -> torch.Tensor:
    position = torch.arange(num_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class _Attention(nn.Module):
    """Cross-attention with LayerNorm on each head's queries and keys (published ``Attention``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(z).reshape(b, z.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    """timm's ``Mlp`` (fc1, GELU, fc2) without its no-op dropouts; same parameter names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.x_norm, self.z_norm, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.x_norm(x), self.z_norm(z))
        return x + self.mlp(self.norm2(x))


class OfficialHistAugModel(nn.Module):
    """The published HistAug network, with the published ``forward`` and ``sample_aug_params``.

    Args:
        config: the model keys of a release's ``config.json``.

    Shape:
        features ``(B, input_dim)``; ``aug_params`` ``{name: (value (B,), position (B,))}`` ->
        ``(B, input_dim)``, in the dtype of ``features``.

    Example:
        >>> config = OfficialHistAugConfig(input_dim=16, depth=1, num_heads=2, chunk_size=2,
        ...                                transforms={"parameters": {"hue": [-0.5, 0.5], "rotation": 0.75}})
        >>> model = OfficialHistAugModel(config)
        >>> params = model.sample_aug_params(3, mode="wsi_wise", generator=torch.Generator().manual_seed(0))
        >>> sorted(params)[:3], model(torch.randn(3, 16), params).shape
        (['brightness', 'contrast', 'crop'], torch.Size([3, 16]))
    """

    def __init__(self, config: OfficialHistAugConfig) -> None:
        super().__init__()
        self.config = config
        self.transforms_parameters = dict(config.transforms["parameters"])
        self.aug_param_names = sorted(self.transforms_parameters)
        self.input_dim, self.chunk_size = config.input_dim, config.chunk_size
        self.embed_dim = width = config.input_dim // config.chunk_size
        self.register_buffer("chunk_pos_embeddings_buffer", _sinusoidal(config.chunk_size, width))
        count = len(self.transforms_parameters)
        if config.use_transform_pos_embeddings:
            if config.positional_encoding_type == "learnable":
                self.sequence_pos_embedding = nn.Embedding(count, width)
            else:
                self.register_buffer("sequence_pos_embedding", _sinusoidal(count, width))
        self.transform_embeddings = nn.ModuleDict()
        for name in self.transforms_parameters:
            size = OFFICIAL_TRANSFORMS[name]
            self.transform_embeddings[name] = (nn.Embedding(size, width) if size is not None else
                                               nn.Sequential(nn.Linear(1, 2 * width), nn.SiLU(),
                                                             nn.Linear(2 * width, width)))
        self.features_embed = nn.Sequential(nn.Linear(config.input_dim, width), nn.LayerNorm(width))  # unused
        self.blocks = nn.ModuleList(_Block(width, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(config.input_dim, config.input_dim), getattr(nn, config.final_activation)())

    # -- parameters ----------------------------------------------------------------------------

    def sample_aug_params(
        self, batch_size: int, device: torch.device | str | None = None, mode: str = "wsi_wise", *,
        generator: torch.Generator | None = None, strength: float = 1.0,
    ) -> OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Draw ``{name: (value, position)}`` for ``batch_size`` embeddings, as the published sampler.

        ``"wsi_wise"`` draws once and repeats it (a rotation or crop, when applied, is then never
        the identity); ``"instance_wise"`` draws per row. Positions are a random order of the
        configured transforms; supported transforms missing from the config get zeros at the
        tail positions. genpath's changes: every draw uses torch's RNG (``generator`` or the global
        one, never Python's ``random``), ``device`` defaults to the model's, and ``strength``
        (keyword-only) scales the continuous values towards 0 (their identity).
        """
        if mode not in _MODES:
            raise ValueError(f"mode: expected 'instance_wise' or 'wsi_wise', got {mode!r}")
        if batch_size < 0 or not 0.0 <= strength <= 1.0:
            raise ValueError(f"batch_size, strength: expected >= 0 and in [0, 1], got {batch_size} and {strength}")
        device = torch.device(device) if device is not None else self.head[0].weight.device
        wsi = mode == "wsi_wise"
        n, rows = batch_size, (1 if wsi else batch_size)
        names = self.aug_param_names

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator)

        order = torch.stack([torch.randperm(len(names), generator=generator) for _ in range(rows)]) if rows else \
            torch.empty(0, len(names), dtype=torch.long)
        positions = order.argsort(1).expand(n, -1) if wsi else order.argsort(1)
        out: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        for i, name in enumerate(names):
            setting, size = self.transforms_parameters[name], OFFICIAL_TRANSFORMS[name]
            if size is None:
                low, high = map(float, setting)
                value = (low + (high - low) * rand(rows)) * strength
            else:
                on = rand(rows) < float(setting)
                if name in ("rotation", "crop"):  # published: wsi_wise 1..3 / 1..4, instance_wise 0..3 / 0..4
                    value = torch.randint(int(wsi), 4 if name == "rotation" else 5, (rows,), generator=generator) * on
                else:
                    value = on.to(torch.int32)
            out[name] = (value.expand(n).clone().to(device), positions[:, i].clone().to(device))
        for j, name in enumerate(m for m in _SUPPORTED_ORDER if m not in self.transforms_parameters):
            dtype = torch.float32 if OFFICIAL_TRANSFORMS[name] is None else (
                torch.int64 if name in ("rotation", "crop") else torch.int32)
            out[name] = (torch.zeros(n, dtype=dtype, device=device),
                         torch.full((n,), len(names) + j, dtype=torch.long, device=device))
        return out

    def _tokens(self, aug_params: Mapping[str, Any], n: int) -> torch.Tensor:
        if not isinstance(aug_params, Mapping):
            raise TypeError(f"aug_params: expected a dict {{name: (value, position)}}, got {type(aug_params).__name__}")
        unknown = sorted(set(aug_params) - set(OFFICIAL_TRANSFORMS))
        missing = sorted(set(self.transforms_parameters) - set(aug_params))
        if unknown or missing:
            raise ValueError(f"aug_params: expected the names {self.aug_param_names}, got unknown {unknown} and "
                             f"missing {missing}")
        device, tokens = self.head[0].weight.device, []
        for name, item in aug_params.items():
            if not (isinstance(item, tuple | list) and len(item) == 2
                    and all(isinstance(t, torch.Tensor) and tuple(t.shape) == (n,) for t in item)):
                got = [getattr(t, "shape", t) for t in item] if isinstance(item, tuple | list) else item
                raise ValueError(f"aug_params[{name!r}]: expected (value, position) tensors of shape ({n},), got {got}")
            value, position = item[0].to(device), item[1].to(device)
            if name not in self.transforms_parameters:  # the published sampler's zero-filled extras
                if bool(value.any()):
                    raise ValueError(f"aug_params[{name!r}]: this checkpoint was not trained on {name!r}; expected 0 "
                                     "(off), got non-zero values")
                continue
            size = OFFICIAL_TRANSFORMS[name]
            if size is None:
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"aug_params[{name!r}]: expected finite values, got NaN or inf")
                token = self.transform_embeddings[name](value[:, None].float())
            else:
                if value.is_floating_point() or value.min() < 0 or value.max() >= size:
                    raise ValueError(f"aug_params[{name!r}]: expected integers in 0..{size - 1}, got "
                                     f"{value.dtype} in [{value.min().item()}, {value.max().item()}]")
                token = self.transform_embeddings[name](value.long())
            if self.config.use_transform_pos_embeddings:
                count = len(self.transforms_parameters)
                if position.is_floating_point() or position.min() < 0 or position.max() >= count:
                    raise ValueError(f"aug_params[{name!r}]: expected integer positions in 0..{count - 1}, got "
                                     f"{position.dtype} in [{position.min().item()}, {position.max().item()}]")
                table = self.sequence_pos_embedding
                token = token + (table(position.long()) if isinstance(table, nn.Embedding) else table[position.long()])
            tokens.append(token)
        return torch.stack(tokens, 1)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, aug_params: Mapping[str, Any]) -> torch.Tensor:
        """Predict the embeddings of the transformed patches (published ``HistaugModel.forward``)."""
        d = self.input_dim
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != d:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features: expected (B,{d}) for this checkpoint, got {got}")
        if not features.is_floating_point() or not bool(torch.isfinite(features).all()):
            raise ValueError("features: expected finite floating-point values, got NaN/inf or an integer dtype")
        weight = self.head[0].weight
        z = self._tokens(aug_params, len(features))
        x = features.to(weight).reshape(len(features), self.chunk_size, self.embed_dim)
        x = x + self.chunk_pos_embeddings_buffer
        for block in self.blocks:
            x = block(x, z)
        out = self.head(self.norm(x).reshape(len(features), d))
        return out.to(features.device, features.dtype)


# -- loading -------------------------------------------------------------------------------------


def read_model_type(folder: str | Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (None without one): ``"histaug"`` marks an official release."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"model: expected a JSON config.json in {folder}, got {str(error).splitlines()[0]}") from None
    return data.get("model_type") if isinstance(data, dict) else None


def _few(keys: list[str], limit: int = 8) -> str:
    return str(keys[:limit])[:-1] + (f", ... {len(keys) - limit} more]" if len(keys) > limit else "]")


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        file = folder / name
        if file.is_file():
            break
    else:
        raise ValueError(f"model: expected model.safetensors or pytorch_model.bin in {folder}, got neither")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any refusal (pickle payload, corrupt file) is one line
        raise ValueError(f"weights: expected plain tensors in {file} (weights_only), got "
                         f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"weights: expected a flat {{name: tensor}} state dict in {file}, got {type(state).__name__}")
    return state, file


def load_official_histaug(folder: str | Path) -> OfficialHistAugModel:
    """Load an official HistAug release folder: strict, ``histaug.`` prefix stripped, no code run, float32.

    Raises:
        FileNotFoundError: ``folder`` is not a local folder.
        ValueError: config.json is not an official HistAug config, or the weights do not match it
            (the missing and unexpected keys are listed).
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model: expected a local HistAug folder, got {folder} (missing; genpath never "
                                "downloads)")
    if read_model_type(path) != "histaug":
        raise ValueError(f"model: expected config.json with model_type 'histaug' in {folder}, got "
                         f"{read_model_type(path)!r}")
    data = json.loads((path / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(OfficialHistAugConfig)}
    config = OfficialHistAugConfig(**check_types(OfficialHistAugConfig, {k: v for k, v in data.items() if k in names},
                                                 where=str(path / "config.json")))
    model = OfficialHistAugModel(config)
    raw, file = _read_weights(path)
    state = {k.removeprefix("histaug."): v for k, v in raw.items()}
    expected = model.state_dict()
    optional = {"chunk_pos_embeddings_buffer"} | (
        {"sequence_pos_embedding"} if config.positional_encoding_type == "sinusoidal" else set())  # fixed tables
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected or len(state) != len(raw):
        raise ValueError(f"weights: {file.name} does not match config.json: missing keys {_few(missing)}, unexpected "
                         f"keys {_few(unexpected)}{', duplicates after stripping histaug.' * (len(state) != len(raw))}")
    shapes = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if shapes:
        raise ValueError(f"weights: {file.name} does not match config.json: wrong shapes {_few(shapes)}")
    model.load_state_dict(state, strict=False)
    logger.debug("loaded official HistAug %s (%d tensors)", file, len(state))
    return model.eval().requires_grad_(False)

