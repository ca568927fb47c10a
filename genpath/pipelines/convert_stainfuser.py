"""The published StainFuser checkpoint (one flat state dict) -> a :class:`StainFuserPipeline` folder.

The released weights are the ``state_dict()`` of StainFuser's ``StainFuserArchitecture``
(``R-J96/stainFuser``: ``src/models/arch.py``, built by ``src/misc/model_utils.py``
``load_stainFuser``), saved as ``.safetensors`` or ``.pth`` (a ``module.`` prefix on every key,
from DataParallel, is removed as their ``convert_pytorch_checkpoint`` does):

==========================================  =================================================
published key                                genpath folder
==========================================  =================================================
``encoder.*``                                ``vae/`` (``AutoencoderKL``, SD-2.1-base)
``conditioner.encoder_projector.*``          ``controlnet/`` ``encoder_hid_proj.*`` (Linear 4→1024)
``conditioner.*``                            ``controlnet/`` (``ControlNetModel``)
``noise_predictor.encoder_projector.*``      ``unet/`` ``encoder_hid_proj.*`` (Linear 4→1024)
``noise_predictor.*``                        ``unet/`` (``UNet2DConditionModel``)
(no weights)                                 ``scheduler/`` (``PNDMScheduler``)
==========================================  =================================================

The architectures come from SD-2.1-base configs shipped with genpath
(``genpath/pipelines/configs/stainfuser_sd21/*.json``, StainFuser's ``src/configs/sd21b_*``);
``unet_config`` / ``vae_config`` / ``scheduler_config`` replace them. The ControlNet is configured
the way StainFuser's ``OveriddenControlNet`` configures ``ControlNetModel`` (the UNet's settings it
passes, ``conditioning_embedding_out_channels=(16, 32, 96, 256)``, 3 conditioning channels), plus
``encoder_hid_dim=4, encoder_hid_dim_type="text_proj"`` so its projector has a home (the pipeline
applies it: diffusers' ``ControlNetModel.forward`` does not).

Every key must be used and every weight filled: a missing or unexpected key, or a shape that does
not fit the configs, is a one-line ``ValueError``. The file is read weights-only
(``torch.load(weights_only=True)`` or safetensors): a pickle that would run code is refused
without running it. Models are built on the meta device and take the file's tensors as they are
(no second copy, no random init of 1.3 B parameters).

Example:
    >>> pipe, summary = build_stainfuser_pipeline("checkpoint.safetensors")  # doctest: +SKIP
    >>> pipe.save_pretrained("stainfuser_converted")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from genpath.utils.logging import get_logger

logger = get_logger(__name__)

#: SD-2.1-base configs StainFuser builds its models from (shipped as package data).
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "stainfuser_sd21"
#: published prefix -> genpath component
PREFIXES = {"encoder.": "vae", "conditioner.": "controlnet", "noise_predictor.": "unet"}
#: StainFuser's target-token projectors -> diffusers' name for them
PROJECTOR, HID_PROJ = "encoder_projector.", "encoder_hid_proj."
#: ``OveriddenControlNet``: conditioning embedding widths, and the UNet settings it passes to ``ControlNetModel``
CONDITIONING_CHANNELS = (16, 32, 96, 256)
CONTROLNET_FROM_UNET = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                        "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor",
                        "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim",
                        "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
                        "resnet_time_scale_shift", "projection_class_embeddings_input_dim")


@dataclass
class StainFuserConfigs:
    """The four component configs (plain dicts, as diffusers' ``from_config`` takes them)."""

    unet: dict[str, Any]
    controlnet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def read_config(path: str | Path | None, argument: str, default: str, class_name: str) -> tuple[dict[str, Any], str]:
    """Read one JSON config (``path``, or the shipped ``default``); private ``_`` keys are dropped.

    Raises:
        FileNotFoundError: ``path`` is missing.
        ValueError: not a JSON object, or written for another class (``_class_name``).
    """
    file = CONFIG_DIR / default if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{argument}: expected a JSON config file, got {file} "
                                f"({'a folder' if file.is_dir() else 'missing'})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: expected a JSON config in {file}, got a parse error ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: expected a JSON object in {file}, got {type(data).__name__}")
    if data.get("_class_name", class_name) != class_name:
        raise ValueError(f"{argument}: expected a {class_name} config in {file}, got _class_name "
                         f"{data['_class_name']!r}")
    return {k: v for k, v in data.items() if not k.startswith("_")}, ("shipped SD-2.1-base" if path is None
                                                                      else str(file))


def stainfuser_configs(unet_config: str | Path | None = None, vae_config: str | Path | None = None,
                       scheduler_config: str | Path | None = None) -> StainFuserConfigs:
    """Return the UNet, ControlNet, VAE and scheduler configs StainFuser builds (SD-2.1-base unless given)."""
    unet, unet_src = read_config(unet_config, "unet_config", "unet.json", "UNet2DConditionModel")
    vae, vae_src = read_config(vae_config, "vae_config", "vae.json", "AutoencoderKL")
    scheduler, scheduler_src = read_config(scheduler_config, "scheduler_config", "scheduler.json", "PNDMScheduler")
    tokens = int(vae.get("latent_channels", 4))  # one token per latent cell, 4 wide (encoder_hid_dim=4)
    unet = {**unet, "encoder_hid_dim": tokens, "encoder_hid_dim_type": "text_proj"}
    controlnet = {k: unet[k] for k in CONTROLNET_FROM_UNET if k in unet}
    controlnet.update(controlnet_conditioning_channel_order="rgb", conditioning_embedding_out_channels=
                      list(CONDITIONING_CHANNELS), conditioning_channels=3, encoder_hid_dim=tokens,
                      encoder_hid_dim_type="text_proj")
    return StainFuserConfigs(unet=unet, controlnet=controlnet, vae=vae, scheduler=scheduler,
                             sources={"unet": unet_src, "vae": vae_src, "scheduler": scheduler_src})


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the flat state dict: ``.safetensors``, or any other suffix through ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        ValueError: not a weights-only state dict of tensors (a code-executing pickle is refused unrun).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"src: expected a StainFuser checkpoint file (.safetensors or .pth), got {path} "
                                f"({'a folder' if path.is_dir() else 'missing'})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, BadZipFile, EOFError, SafetensorError, ...
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise ValueError(f"src: expected a weights-only state dict in {path}, got a file that "
                         f"{'safetensors' if path.suffix == '.safetensors' else 'torch.load(weights_only=True)'} "
                         f"refuses ({type(error).__name__}: {first}); genpath never unpickles code") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"src: expected a flat state dict (name -> tensor) in {path}, got {type(data).__name__}"
                         f"{' (empty)' if isinstance(data, dict) else ''}")
    bad = [str(k) for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"src: expected a flat state dict of tensors in {path}, got non-tensor entries {bad[:5]}")
    if all(k.startswith("module.") for k in data):  # DataParallel, as StainFuser's convert_pytorch_checkpoint
        data = {k[len("module."):]: v for k, v in data.items()}
    return dict(data)


def _published_name(component: str, key: str) -> str:
    prefix = next(p for p, c in PREFIXES.items() if c == component)
    return prefix + (PROJECTOR + key[len(HID_PROJ):] if key.startswith(HID_PROJ) else key)


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Split the flat dict into ``{component: {diffusers key: tensor}}``; also return keys of no component."""
    parts: dict[str, dict[str, torch.Tensor]] = {c: {} for c in PREFIXES.values()}
    stray = []
    for key, tensor in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            stray.append(key)
            continue
        name = key[len(prefix):]
        if PREFIXES[prefix] != "vae" and name.startswith(PROJECTOR):
            name = HID_PROJ + name[len(PROJECTOR):]
        parts[PREFIXES[prefix]][name] = tensor
    return parts, stray


def _short(keys: list[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _build_empty(configs: StainFuserConfigs) -> dict[str, torch.nn.Module]:
    """Build the three models on the meta device (no memory, no init); name a config that does not build."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    models = {}
    for name, cls, argument in (("vae", AutoencoderKL, "vae_config"), ("unet", UNet2DConditionModel, "unet_config"),
                                ("controlnet", ControlNetModel, "unet_config")):
        try:
            with torch.device("meta"):
                models[name] = cls.from_config(getattr(configs, name))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(f"{argument}: expected a config that builds a {cls.__name__}, got an error "
                             f"({type(error).__name__}: {first})") from None
    return models


def expected_checkpoint_shapes(configs: StainFuserConfigs | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of the published flat checkpoint the configs describe, with its shape (nothing allocated).

    Example:
        >>> shapes = expected_checkpoint_shapes()  # SD-2.1-base
        >>> shapes["noise_predictor.encoder_projector.weight"], shapes["conditioner.encoder_projector.weight"]
        ((1024, 4), (1024, 4))
    """
    models = _build_empty(configs or stainfuser_configs())
    return {_published_name(name, k): tuple(v.shape) for name, m in models.items() for k, v in m.state_dict().items()}


def build_stainfuser_pipeline(src: str | Path, unet_config: str | Path | None = None,
                              vae_config: str | Path | None = None,
                              scheduler_config: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Load the published checkpoint into a :class:`~genpath.pipelines.stainfuser_published.StainFuserPipeline`.

    Args:
        src: the released file (``.safetensors``, or ``.pth`` read weights-only).
        unet_config: a UNet2DConditionModel JSON config replacing the shipped SD-2.1-base one (the
            ControlNet is derived from it).
        vae_config: an AutoencoderKL JSON config replacing the shipped one.
        scheduler_config: a PNDMScheduler JSON config replacing the shipped one.

    Returns:
        ``(pipeline, summary)``: the pipeline (float as stored) and a record of the configs and key counts.

    Raises:
        FileNotFoundError: ``src`` or a config file is missing.
        ValueError: a bad file or config, missing / unexpected keys or wrong shapes (one line, listing them).
    """
    from diffusers import PNDMScheduler

    from genpath.pipelines.stainfuser_published import StainFuserPipeline

    configs = stainfuser_configs(unet_config, vae_config, scheduler_config)
    try:
        scheduler = PNDMScheduler.from_config(configs.scheduler)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"scheduler_config: expected a config that builds a PNDMScheduler, got an error "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    models = _build_empty(configs)
    state = read_checkpoint(src)
    parts, stray = split_checkpoint(state)
    missing, unexpected, shapes = [], list(stray), []
    for name, model in models.items():
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        given = parts[name]
        missing += [_published_name(name, k) for k in expected if k not in given]
        unexpected += [_published_name(name, k) for k in given if k not in expected]
        shapes += [f"{_published_name(name, k)} {tuple(given[k].shape)} (configs: {expected[k]})"
                   for k in expected if k in given and tuple(given[k].shape) != expected[k]]
    if missing or unexpected:
        found = [p for p in PREFIXES if any(k.startswith(p) for k in state)]
        hint = "" if found else f" (no key starts with {'/'.join(PREFIXES)}: not a StainFuser checkpoint?)"
        raise ValueError(f"src: expected the StainFuser layout for the given configs, got {len(missing)} missing "
                         f"[{_short(missing)}] and {len(unexpected)} unexpected [{_short(unexpected)}] keys in "
                         f"{src}{hint}")
    if shapes:
        raise ValueError(f"src: expected tensor shapes that fit the configs (--unet-config / --vae-config), got "
                         f"{len(shapes)} that do not: {_short(shapes, 3)}")
    for name, model in models.items():
        model.load_state_dict(parts[name], strict=True, assign=True)
        left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
        if left:  # a buffer no checkpoint holds: never leave it unfilled
            raise ValueError(f"{name}: expected every weight filled from {src}, got {_short(left)} unfilled")
        model.eval()
    pipe = StainFuserPipeline(vae=models["vae"], unet=models["unet"], controlnet=models["controlnet"],
                              scheduler=scheduler)
    pipe.check_components()
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    summary = {"keys": {name: len(parts[name]) for name in models}, "dtypes": dtypes, "configs": configs.sources,
               "controlnet": {k: configs.controlnet[k] for k in ("conditioning_embedding_out_channels",
                                                                 "conditioning_channels", "encoder_hid_dim")},
               "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}}
    logger.info("read StainFuser checkpoint %s: %s", src, summary["keys"])
    return pipe, summary
