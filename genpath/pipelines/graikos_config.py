"""Read Graikos et al.'s project YAML (CompVis latent-diffusion format) into diffusers settings, instantiating nothing.

The file is parsed with ``yaml.safe_load`` (a ``!!python`` tag is a parse error); each
``target`` is compared as a string with the classes genpath converts, and every option of the
UNet, the VQ first stage and the conditioner is either translated, checked to be the value the
conversion assumes, or known to matter only for training (``use_checkpoint``, ``use_fp16``,
``ckpt_path``, ``dropout``, ``lossconfig``, ``data``, ``lightning``). Anything else is refused in
one line naming the YAML path, so a checkpoint of another architecture is never half-converted.
Numbers written ``1e-4`` (a string to YAML 1.1, a float to OmegaConf) are read as OmegaConf does.

Example:
    >>> cfg = read_graikos_config("configs/latent-diffusion/crc/only_patch_20x.yaml")  # doctest: +SKIP
    >>> cfg.unet["block_out_channels"], cfg.embed_dims  # doctest: +SKIP
    ([192, 384, 576, 960], (768,))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARGUMENT = "--config"
LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
VQ = "ldm.models.autoencoder.VQModelInterface"
CONDITIONERS = {"ldm.modules.encoders.modules.PatchEmbedder": "PatchEmbedder",
                "ldm.modules.encoders.modules.SSLEmbedder": "SSLEmbedder"}
_REQUIRED = object()

#: UNetModel options: the value the conversion assumes (None: translated, or free).
UNET_OPTIONS: dict[str, Any] = {
    "image_size": None, "in_channels": None, "out_channels": None, "model_channels": None,
    "attention_resolutions": None, "num_res_blocks": None, "channel_mult": None, "context_dim": None,
    "num_heads": None, "num_head_channels": None, "transformer_depth": None, "use_linear_in_transformer": None,
    "use_spatial_transformer": True, "conv_resample": True, "dims": 2, "num_classes": None,
    "use_scale_shift_norm": False, "resblock_updown": False, "n_embed": None, "disable_self_attentions": None,
    "num_attention_blocks": None, "disable_middle_self_attn": False, "legacy": None,
    # training, precision or attention-kernel choices: no effect on the weights' function
    "use_checkpoint": None, "use_fp16": None, "use_bf16": None, "ckpt_path": None, "ignore_keys": None,
    "dropout": None, "num_heads_upsample": None, "use_new_attention_order": None, "adm_in_channels": None,
}
#: Encoder/Decoder ``ddconfig`` options and the value the conversion assumes.
DDCONFIG_OPTIONS: dict[str, Any] = {
    "double_z": False, "z_channels": None, "resolution": None, "in_channels": None, "out_ch": None, "ch": None,
    "ch_mult": None, "num_res_blocks": None, "attn_resolutions": [], "dropout": None, "resamp_with_conv": True,
    "use_linear_attn": False, "attn_type": "vanilla", "give_pre_end": False, "tanh_out": False,
}
CONDITIONER_OPTIONS = {"PatchEmbedder": ("patch_ssl_key", "patch_embed_dim", "target_dim", "normalize_ssl"),
                       "SSLEmbedder": ("patch_ssl_key", "region_ssl_key", "patch_embed_dim", "region_embed_dim",
                                       "normalize_ssl")}


@dataclass(frozen=True)
class GraikosLDMConfig:
    """What the conversion needs from the project YAML.

    Attributes:
        timesteps, linear_start, linear_end: the DDPM's linear β schedule (``linspace(√s, √e, T)²``).
        scale_factor: latents = ``scale_factor`` × first-stage output (1.0 published).
        scale_by_std: the scale factor was measured at training and is a checkpoint buffer.
        use_ema: sample with the ``model_ema.*`` UNet weights (their ``ema_scope()``).
        unet: ``UNet2DConditionModel`` keyword arguments.
        vae: ``VQModel`` keyword arguments.
        conditioner: ``PatchEmbedder`` or ``SSLEmbedder``.
        embed_dims: input width of each conditioner ``Linear`` (one token each).
        cross_attention_dim: their output width (the UNet's ``context_dim``).
        normalize: ``normalize_ssl`` (L2-normalise embeddings first).
    """

    timesteps: int
    linear_start: float
    linear_end: float
    scale_factor: float
    scale_by_std: bool
    use_ema: bool
    unet: dict[str, Any]
    vae: dict[str, Any]
    conditioner: str
    embed_dims: tuple[int, ...]
    cross_attention_dim: int
    normalize: bool


def _fail(where: str, wanted: str, value: Any, raw: bool = False) -> ValueError:
    """Return the one-line error ``--config: expected WHERE WANTED, got VALUE`` (``raw``: VALUE is words)."""
    text = str(value) if raw else repr(value)
    return ValueError(f"{ARGUMENT}: expected {where} {wanted}, got {text[:80] + '...' if len(text) > 80 else text}")


def _map(tree: Any, key: str, where: str) -> dict[str, Any]:
    value = tree.get(key) if isinstance(tree, dict) else None
    if not isinstance(value, dict):
        raise _fail(f"{where}.{key}" if where else key, "to be a mapping", value)
    return value


def _value(tree: dict[str, Any], key: str, where: str, kind: str, default: Any = _REQUIRED) -> Any:
    """Read ``tree[key]`` as ``kind`` (int, float, bool, str, ints); missing → ``default`` (or an error)."""
    path = f"{where}.{key}"
    if key not in tree:
        if default is _REQUIRED:
            raise _fail(path, f"({kind})", "nothing (missing)", raw=True)
        return default
    value = tree[key]
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _fail(path, "to be a number", tree[key]) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _fail(path, "to be a finite number", tree[key])
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "ints" and isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        return [int(v) for v in value]
    raise _fail(path, f"to be {'a list of integers' if kind == 'ints' else 'a ' + kind}", value)


def _target(tree: dict[str, Any], where: str, allowed: tuple[str, ...]) -> str:
    target = tree.get("target")
    if target not in allowed:
        raise _fail(f"{where}.target", f"to be {' or '.join(allowed)} (what genpath converts)", target)
    return target


def _check_options(params: dict[str, Any], options: dict[str, Any], where: str) -> None:
    """Refuse unknown options and options whose value the conversion does not handle."""
    unknown = sorted(set(params) - set(options))
    if unknown:
        raise _fail(where, "to hold only options genpath converts", f"unknown options {unknown}", raw=True)
    for key, wanted in options.items():
        if wanted is not None and key in params and params[key] != wanted:
            raise _fail(f"{where}.{key}", f"to be {wanted!r} (the only value genpath converts)", params[key])
    for key in ("num_classes", "n_embed", "disable_self_attentions", "num_attention_blocks"):
        if key in options and params.get(key) is not None:
            raise _fail(f"{where}.{key}", "to be unset (genpath converts cross-attention UNets only)", params[key])


def _unet(params: dict[str, Any], where: str) -> dict[str, Any]:
    _check_options(params, UNET_OPTIONS, where)
    if params.get("use_spatial_transformer") is not True:
        raise _fail(f"{where}.use_spatial_transformer", "to be True (cross-attention on the embeddings)",
                    params.get("use_spatial_transformer"))
    model_channels = _value(params, "model_channels", where, "int")
    mult = _value(params, "channel_mult", where, "ints")
    blocks = [model_channels * m for m in mult]
    if not mult or any(b < 1 or b % 32 for b in blocks):
        raise _fail(f"{where}.channel_mult", "to give widths that are positive multiples of 32 (GroupNorm32)", mult)
    attention = _value(params, "attention_resolutions", where, "ints")
    heads_n = _value(params, "num_heads", where, "int", -1)
    head_channels = _value(params, "num_head_channels", where, "int", -1)
    if (heads_n == -1 and head_channels == -1) or min(heads_n, head_channels) < -1 or 0 in (heads_n, head_channels):
        raise _fail(where, "to set num_heads or num_head_channels", f"num_heads {heads_n}, num_head_channels "
                    f"{head_channels}", raw=True)
    heads = [heads_n if head_channels == -1 else max(1, ch // head_channels) for ch in blocks]
    if any(ch % h for ch, h in zip(blocks, heads, strict=True)):
        raise _fail(where, "to split every width into whole attention heads", f"widths {blocks}, heads {heads}",
                    raw=True)
    context = params.get("context_dim")
    if isinstance(context, list) and len(context) == 1:
        context = context[0]
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise _fail(f"{where}.context_dim", "to be a positive integer", params.get("context_dim"))
    ds = [2 ** i for i in range(len(blocks))]
    down = tuple("CrossAttnDownBlock2D" if d in attention else "DownBlock2D" for d in ds)
    up = tuple("CrossAttnUpBlock2D" if d in attention else "UpBlock2D" for d in reversed(ds))
    return {"sample_size": _value(params, "image_size", where, "int"),
            "in_channels": _value(params, "in_channels", where, "int"),
            "out_channels": _value(params, "out_channels", where, "int"),
            "down_block_types": down, "up_block_types": up, "block_out_channels": tuple(blocks),
            "layers_per_block": _value(params, "num_res_blocks", where, "int"),
            "cross_attention_dim": context, "attention_head_dim": tuple(heads),
            "transformer_layers_per_block": _value(params, "transformer_depth", where, "int", 1),
            "use_linear_projection": _value(params, "use_linear_in_transformer", where, "bool", False),
            "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32, "norm_eps": 1e-5,
            "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1}


def _vq(params: dict[str, Any], where: str, scale_factor: float) -> dict[str, Any]:
    if params.get("remap") is not None or params.get("use_ema"):
        raise _fail(where, "without remap or use_ema (published VQ-f4)",
                    {k: params.get(k) for k in ("remap", "use_ema")})
    dd_where = f"{where}.ddconfig"
    dd = _map(params, "ddconfig", where)
    if "double_z" not in dd:
        raise _fail(f"{dd_where}.double_z", "to be False (a VQ first stage)", "nothing (the Encoder default True)",
                    raw=True)
    _check_options(dd, DDCONFIG_OPTIONS, dd_where)
    embed_dim = _value(params, "embed_dim", where, "int")
    z_channels = _value(dd, "z_channels", dd_where, "int")
    if embed_dim != z_channels:
        raise _fail(f"{where}.embed_dim", f"to equal ddconfig.z_channels {z_channels} (genpath's pipelines read "
                    "the latent width from VQModel.latent_channels)", embed_dim)
    ch = _value(dd, "ch", dd_where, "int")
    mult = _value(dd, "ch_mult", dd_where, "ints")
    if not mult or any(ch * m < 1 or ch * m % 32 for m in mult):
        raise _fail(f"{dd_where}.ch_mult", "to give widths that are positive multiples of 32 (GroupNorm 32)", mult)
    return {"in_channels": _value(dd, "in_channels", dd_where, "int"),
            "out_channels": _value(dd, "out_ch", dd_where, "int"),
            "down_block_types": ("DownEncoderBlock2D",) * len(mult),
            "up_block_types": ("UpDecoderBlock2D",) * len(mult),
            "block_out_channels": tuple(ch * m for m in mult),
            "layers_per_block": _value(dd, "num_res_blocks", dd_where, "int"), "act_fn": "silu",
            "latent_channels": z_channels, "sample_size": _value(dd, "resolution", dd_where, "int"),
            "num_vq_embeddings": _value(params, "n_embed", where, "int"), "norm_num_groups": 32,
            "vq_embed_dim": embed_dim, "scaling_factor": scale_factor, "norm_type": "group",
            "mid_block_add_attention": True}


def _conditioner(tree: dict[str, Any], where: str) -> tuple[str, tuple[int, ...], int, bool]:
    kind = CONDITIONERS[_target(tree, where, tuple(CONDITIONERS))]
    params = tree.get("params") or {}
    if not isinstance(params, dict):
        raise _fail(f"{where}.params", "to be a mapping", params)
    unknown = sorted(set(params) - set(CONDITIONER_OPTIONS[kind]))
    if unknown:
        raise _fail(f"{where}.params", f"to hold only {list(CONDITIONER_OPTIONS[kind])}", f"unknown options {unknown}",
                    raw=True)
    p = f"{where}.params"
    normalize = _value(params, "normalize_ssl", p, "bool", False)
    if kind == "PatchEmbedder":
        dims = (_value(params, "patch_embed_dim", p, "int", 768),)
        width = _value(params, "target_dim", p, "int", 512)
    else:  # SSLEmbedder: patch and region, projected to a fixed 512
        dims = (_value(params, "patch_embed_dim", p, "int", 384), _value(params, "region_embed_dim", p, "int", 768))
        width = 512
    if any(d < 1 for d in dims) or width < 1:
        raise _fail(p, "to hold positive widths", {"embed_dims": dims, "target_dim": width})
    return kind, dims, width, normalize


def read_graikos_config(path: str | Path) -> GraikosLDMConfig:
    """Read their project YAML with ``yaml.safe_load``; translate and check it (see the module doc).

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        ValueError: one line naming ``--config`` and the YAML path: a parse error, another
            target, an option genpath does not convert.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{ARGUMENT}: expected their project YAML file, got {path} "
                                f"({'a folder' if path.is_dir() else 'missing'})")
    try:
        tree = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{ARGUMENT}: expected a YAML file (read with yaml.safe_load), got {path} "
                         f"({type(error).__name__}: {first})") from None
    model = _map(tree, "model", "")
    _target(model, "model", (LDM,))
    params = _map(model, "params", "model")
    w = "model.params"
    if params.get("conditioning_key") != "crossattn":
        raise _fail(f"{w}.conditioning_key", "to be 'crossattn'", params.get("conditioning_key"))
    for key, wanted in (("parameterization", "eps"), ("beta_schedule", "linear"), ("given_betas", None)):
        if params.get(key, wanted) != wanted:
            raise _fail(f"{w}.{key}", f"to be {wanted!r} (the only value genpath converts)", params[key])
    scale_factor = _value(params, "scale_factor", w, "float", 1.0)
    if scale_factor <= 0:
        raise _fail(f"{w}.scale_factor", "to be positive", scale_factor)
    timesteps = _value(params, "timesteps", w, "int", 1000)
    start, end = _value(params, "linear_start", w, "float", 1e-4), _value(params, "linear_end", w, "float", 2e-2)
    if timesteps < 2 or not 0 < start < end < 1:
        raise _fail(w, "timesteps >= 2 and 0 < linear_start < linear_end < 1", (timesteps, start, end))
    unet_cfg = _map(params, "unet_config", w)
    _target(unet_cfg, f"{w}.unet_config", (UNET,))
    unet = _unet(_map(unet_cfg, "params", f"{w}.unet_config"), f"{w}.unet_config.params")
    first = _map(params, "first_stage_config", w)
    _target(first, f"{w}.first_stage_config", (VQ,))
    vae = _vq(_map(first, "params", f"{w}.first_stage_config"), f"{w}.first_stage_config.params", scale_factor)
    if not unet["in_channels"] == unet["out_channels"] == vae["vq_embed_dim"]:
        raise _fail(f"{w}.unet_config.params", f"in/out channels equal to the first stage's embed_dim "
                    f"{vae['vq_embed_dim']}", (unet["in_channels"], unet["out_channels"]))
    kind, dims, width, normalize = _conditioner(_map(params, "cond_stage_config", w), f"{w}.cond_stage_config")
    if width != unet["cross_attention_dim"]:
        raise _fail(f"{w}.cond_stage_config", f"to project to the UNet's context_dim {unet['cross_attention_dim']}",
                    width)
    return GraikosLDMConfig(timesteps=timesteps, linear_start=start, linear_end=end, scale_factor=scale_factor,
                            scale_by_std=_value(params, "scale_by_std", w, "bool", False),
                            use_ema=_value(params, "use_ema", w, "bool", True), unet=unet, vae=vae,
                            conditioner=kind, embed_dims=dims, cross_attention_dim=width, normalize=normalize)
