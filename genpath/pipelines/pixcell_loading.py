"""Reading PixCell's published folders without their code: configs, safetensors, the extra tensors, the VAE.

Used by :mod:`genpath.pipelines.pixcell` and :mod:`genpath.pipelines.pixcell_controlnet`; see the
first for the layout. Weights are read from safetensors only and loaded strictly (a missing,
unexpected or mis-shaped tensor is a one-line error naming it); no file of the folder is imported.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PixArtTransformer2DModel

from genpath.models.vae import latent_scaling, load_vae
from genpath.pipelines.loading import ARGUMENT, check_pretrained_folder
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

#: the transformer classes of the published folders (rebuilt as diffusers' PixArtTransformer2DModel)
PIXCELL_TRANSFORMERS = ("PixCellTransformer2DModel", "PixCellTransformer2DModelControlNet",
                        "PixArtTransformer2DModel")
UNCOND_KEY = "caption_projection.uncond_embedding"
POS_KEY = "y_pos_embed.y_pos_embed"
SD35_VAE = ("the SD3.5 VAE (the vae/ subfolder of stabilityai/stable-diffusion-3.5-large: 16 latent channels, "
            "scaling_factor 1.5305, shift_factor 0.0609), which PixCell's repository does not include")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_json(path: Path, argument: str = ARGUMENT) -> dict[str, Any]:
    """Parse a JSON object file; one-line errors naming ``argument``."""
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: expected {path}, got none")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: expected JSON in {path}, got a parse error ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: expected a JSON object in {path}, got {type(data).__name__}")
    return data


def read_weights(folder: Path, argument: str = ARGUMENT) -> dict[str, torch.Tensor]:
    """Read ``folder/diffusion_pytorch_model.safetensors`` (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        raise ValueError(f"{argument}: expected the weights as {path}, got {found or 'no files'} "
                         "(genpath reads safetensors only)")
    return load_file(str(path))


def build_from_config(cls: type, config: dict[str, Any]) -> Any:
    """Instantiate ``cls`` with the keys of ``config`` its ``__init__`` takes (others, e.g. ``_class_name``, left).

    Parameters are created empty (accelerate's ``init_empty_weights``: no random init of a
    600M-parameter model whose weights are loaded next, see :func:`load_strict`); buffers are real.
    """
    from accelerate import init_empty_weights

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    with init_empty_weights(include_buffers=False):
        return cls(**{k: v for k, v in config.items() if k in accepted})


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load every tensor of ``module`` from ``state`` (assigned), naming missing, unexpected and mis-shaped ones."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = [f"{label} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise ValueError(f"{ARGUMENT}: expected the tensors of a {type(module).__name__} in {where}, got "
                         + "; ".join(parts))
    module.load_state_dict(state, strict=True, assign=True)


def cast(module: Any, dtype: torch.dtype) -> Any:
    """Return ``module`` in eval mode and ``dtype`` (cast only when needed: diffusers warns on every cast)."""
    return (module if module.dtype == dtype else module.to(dtype)).eval()


def caption_pos_embed(dim: int, num_tokens: int, base_size: int, interpolation_scale: float = 2.0) -> torch.Tensor:
    """PixCell's 2-D sin-cos embedding of a ``sqrt(T) x sqrt(T)`` UNI token grid, ``(1, T, dim)``.

    Only used when a folder lacks the stored ``y_pos_embed.y_pos_embed`` buffer: grid positions
    ``arange(g) / (g / base_size) / interpolation_scale`` plus a phase ``base_size // T``, height
    then width halves, each ``[sin, cos]`` with frequencies ``10000^(-k / (dim / 4))``.
    """
    side = math.isqrt(num_tokens)
    grid = torch.arange(side, dtype=torch.float64) / (side / base_size) / interpolation_scale
    gw, gh = torch.meshgrid(grid, grid, indexing="xy")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos.reshape(-1) + base_size // num_tokens, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(gw), one(gh)], dim=1).float()[None]


def load_pixcell_transformer(folder: Path, dtype: torch.dtype) -> tuple[PixArtTransformer2DModel, torch.Tensor,
                                                                            torch.Tensor | None]:
    """Rebuild ``folder`` (a published PixCell ``transformer/``) as diffusers' PixArtTransformer2DModel.

    Returns:
        The transformer, the unconditional embedding ``(T, D)`` and the token positions
        ``(1, T, D)`` (None for ``T = 1``).
    """
    config = read_json(folder / "config.json")
    name = config.get("_class_name")
    if name not in PIXCELL_TRANSFORMERS:
        raise ValueError(f"{ARGUMENT}: expected a transformer of class {' or '.join(PIXCELL_TRANSFORMERS)} in "
                         f"{folder}, got {name!r}")
    if config.get("caption_channels") is None:
        raise ValueError(f"{ARGUMENT}: expected caption_channels (the UNI2-h width) in {folder}/config.json, got none")
    transformer = build_from_config(PixArtTransformer2DModel, config)
    state = read_weights(folder)
    uncond = state.pop(UNCOND_KEY, None)
    pos = state.pop(POS_KEY, None)
    tokens, dim = int(config.get("caption_num_tokens", 1)), int(config["caption_channels"])
    if uncond is None or tuple(uncond.shape) != (tokens, dim):
        got = "none" if uncond is None else tuple(uncond.shape)
        raise ValueError(f"{ARGUMENT}: expected {UNCOND_KEY} of shape {(tokens, dim)} (caption_num_tokens x "
                         f"caption_channels) in {folder}, got {got}")
    if tokens > 1 and pos is None:
        logger.info("%s holds no %s; computing PixCell's token positions", folder, POS_KEY)
        pos = caption_pos_embed(dim, tokens, config.get("sample_size", 128) // config.get("patch_size", 2))
    if tokens > 1 and tuple(pos.shape) != (1, tokens, dim):
        raise ValueError(f"{ARGUMENT}: expected {POS_KEY} of shape {(1, tokens, dim)} in {folder}, "
                         f"got {tuple(pos.shape)}")
    load_strict(transformer, state, folder)
    return cast(transformer, dtype), uncond.to(dtype), None if tokens == 1 else pos.to(dtype)


def load_scheduler(folder: Path) -> Any:
    """Build the diffusers scheduler of ``folder/scheduler_config.json`` (the class must be one of diffusers')."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    config = read_json(folder / "scheduler_config.json")
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{ARGUMENT}: expected a diffusers scheduler in {folder}, got {config.get('_class_name')!r}")
    return cls.from_config(config)


def load_pixcell_vae(folder: Path, vae: str | Path | AutoencoderKL | None, dtype: torch.dtype) -> AutoencoderKL:
    """Return the VAE given (a folder or an ``AutoencoderKL``), else ``folder/vae`` if it holds weights.

    Raises:
        FileNotFoundError: none given and ``folder/vae`` holds only a config (PixCell's hub folders).
        ValueError: a VAE whose latent channels, scaling or shift differ from ``folder/vae/config.json``.
    """
    expected = read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    if vae is None:
        if not (folder / "vae" / WEIGHTS).is_file():
            raise FileNotFoundError(f"vae: expected {SD35_VAE} (--vae DIR / vae=), got none for {folder}")
        vae = folder / "vae"
    if not isinstance(vae, AutoencoderKL):
        vae = load_vae(str(check_pretrained_folder(vae, "vae", "AutoencoderKL folder (the SD3.5 VAE)")))
    scale, shift = latent_scaling(vae)
    for key, got in (("latent_channels", vae.config.latent_channels), ("scaling_factor", scale),
                     ("shift_factor", shift)):
        want = expected.get(key)
        if want is not None and not math.isclose(float(want), float(got), rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(f"vae: expected {key} {want} as in {folder / 'vae' / 'config.json'} ({SD35_VAE}), "
                             f"got {got}")
    return cast(vae, dtype)
