"""Published pathology foundation encoders as registry presets, each with its published recipe built in.

``create_encoder("uni2-h", checkpoint_path="models/uni2-h/pytorch_model.bin")`` builds the
architecture with the kwargs of the model card's ``timm.create_model`` call (TRIDENT's loader
agrees), loads the file the hub stores (strictly: missing, unexpected or mis-shaped tensors are
an error naming them), and embeds with the published preprocessing (input size, resize mode,
mean/std) and pooling. The recipe, hub id, licence and access of each are in :data:`RECIPES`.

Keyword arguments other than ``checkpoint_path``/``input_size`` override the architecture
(``depth=1, embed_dim=32, num_heads=2, img_size=28`` builds a tiny copy; tests use them). They
must be JSON values, so ``encoder.json`` can record them next to the preset name and the weight
path; the layer classes (SwiGLU, SiLU) belong to the preset and are named in :data:`RECIPES`.

Nothing downloads and nothing runs code from a file: ``.safetensors`` or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from genpath.encoders.base import IMAGENET_MEAN, IMAGENET_STD, ImageEncoder
from genpath.encoders.registry import register_encoder
from genpath.encoders.weights import load_strict, read_state_dict

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_RECIPE_ONLY = ("mean", "std", "interpolation", "center_crop", "pooling", "arch", "path")


@dataclass(frozen=True)
class Recipe:
    """One published encoder: where it is, what it may be used for, and how it embeds.

    Attributes:
        hub_id: the Hugging Face repository.
        weights: the file in it that ``checkpoint_path`` names.
        licence: its licence.
        access: ``gated`` (an access request on the hub) or ``open``.
        arch: the timm architecture the model card passes to ``timm.create_model``.
        kwargs: the documented ``timm.create_model`` keyword arguments (layer classes by name).
        mean: normalization mean.
        std: normalization std.
        interpolation: resize filter (antialiased) of the published transform.
        input_size: side images are resized to (None: ``img_size``).
        pooling: ``token`` (CLS), ``cls+mean`` (CLS ‖ mean of patch tokens, registers excluded)
            or ``attn-pool`` (CONCH's attentional pooler).
        layout: weight layout: ``timm``, ``dinov2-hf`` (transformers Dinov2Model) or ``conch``.
        source: where the recipe was read.
    """

    hub_id: str
    weights: str
    licence: str
    access: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    input_size: int | None = None
    pooling: str = "token"
    layout: str = "timm"
    source: str = ""


_TRIDENT = "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py"
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
RECIPES: dict[str, Recipe] = {
    "uni": Recipe(
        "MahmoodLab/UNI", "pytorch_model.bin", "CC-BY-NC-ND-4.0", "gated", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        source=f"model card; {_TRIDENT} UNIInferenceEncoder (Resize(224) + CenterCrop(224), ImageNet)"),
    "uni2-h": Recipe(
        "MahmoodLab/UNI2-h", "pytorch_model.bin", "CC-BY-NC-ND-4.0", "gated", "vit_giant_patch14_224",
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, **_SWIGLU, reg_tokens=8,
             dynamic_img_size=True),
        source=f"model card; {_TRIDENT} UNIv2InferenceEncoder (Resize(224) + CenterCrop(224), ImageNet)"),
    "virchow2": Recipe(
        "paige-ai/Virchow2", "pytorch_model.bin", "CC-BY-NC-ND-4.0", "gated", "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
             dynamic_img_size=True, **_SWIGLU),
        interpolation="bicubic", pooling="cls+mean",
        source=f"model card (output[:, 0] ‖ output[:, 5:].mean(1)); {_TRIDENT} Virchow2InferenceEncoder "
               "(Resize(224, bicubic), ImageNet)"),
    "h-optimus-0": Recipe(
        "bioptimus/H-optimus-0", "pytorch_model.bin", "Apache-2.0", "open", "vit_giant_patch14_reg4_dinov2",
        dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        HOPTIMUS_MEAN, HOPTIMUS_STD,
        source=f"model card (224 px at 0.5 µm/px, its own mean/std); {_TRIDENT} HOptimus0InferenceEncoder "
               "(Resize(224))"),
    "h-optimus-1": Recipe(
        "bioptimus/H-optimus-1", "pytorch_model.bin", "CC-BY-NC-ND-4.0", "gated", "vit_giant_patch14_reg4_dinov2",
        dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=False),
        HOPTIMUS_MEAN, HOPTIMUS_STD,
        source=f"model card; {_TRIDENT} HOptimus1InferenceEncoder (Resize(224))"),
    "phikon-v2": Recipe(
        "owkin/phikon-v2", "model.safetensors", "Owkin non-commercial licence", "open", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1.0, num_classes=0, global_pool="token"),
        layout="dinov2-hf",
        source="config.json (Dinov2Model: hidden 1024, 24 layers, 16 heads, patch 16, image 224, layerscale 1.0, "
               f"GELU, eps 1e-6); model card (last_hidden_state[:, 0]); {_TRIDENT} Phikonv2InferenceEncoder "
               "(Resize(224) + CenterCrop(224), ImageNet)"),
    "conch-v1.5": Recipe(
        "MahmoodLab/conchv1_5", "pytorch_model_vision.bin", "CC-BY-NC-ND-4.0", "gated", "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, qkv_bias=True,
             init_values=1.0, num_classes=0, pool_dim=768, pool_heads=8),
        input_size=448, pooling="attn-pool", layout="conch",
        source="mahmoodlab/TRIDENT trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py "
               "(CONCHVisionTower, Resize(448) + CenterCrop(448), ImageNet)"),
}


def _layer(name: str) -> type:
    import timm.layers

    return {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}[name]


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_json_value(v) for v in value)


class PublishedEncoder(ImageEncoder):
    """A published encoder with its recipe: ``forward`` preprocesses, runs the network and pools.

    ``tokens()`` returns the patch tokens after the final norm, prefix tokens (CLS, registers) removed.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe, input_size: int) -> None:
        width = int(model.num_features)
        super().__init__(2 * width if recipe.pooling == "cls+mean" else width, input_size, recipe.mean, recipe.std,
                         recipe.interpolation, center_crop=True)
        self.model, self.pooling = model, recipe.pooling
        trunk = getattr(model, "trunk", model)
        self.prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls+mean":
            tokens = self.model.forward_features(pixels)
            return torch.cat([tokens[:, 0], tokens[:, self.prefix_tokens:].mean(1)], dim=-1)
        return self.model(pixels)

    def encode_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(pixels)[:, self.prefix_tokens:]


def build_published(name: str, checkpoint_path: str | None = None, input_size: int | None = None,
                    **overrides: Any) -> ImageEncoder:
    """Build the preset ``name`` from its local weight file; ``overrides`` change the architecture.

    Raises:
        FileNotFoundError: the weight file is missing.
        ValueError: no file, a pickle that needs code, missing/unexpected/mis-shaped keys, an
            override that is not a JSON value or fixes part of the recipe, or one the architecture rejects.
    """
    import timm

    recipe = RECIPES[name]
    for key, value in overrides.items():
        if key in _RECIPE_ONLY or key in ("mlp_layer", "act_layer"):
            raise ValueError(f"{key}: expected architecture overrides only, got {key}={value!r}; the {name} preset "
                             f"fixes its recipe ({recipe.source.split(';')[0]}); use timm.<arch> for another one")
        if not _json_value(value):
            raise ValueError(f"{key}: expected a JSON value (number, string, boolean, list) that encoder.json can "
                             f"record, got {value!r}")
    kwargs = {**recipe.kwargs, **overrides}
    kwargs.update({k: _layer(v) for k, v in kwargs.items() if k in ("mlp_layer", "act_layer")})
    state = read_state_dict(checkpoint_path, "checkpoint_path", f"{recipe.hub_id} {recipe.weights}")
    layout = f"{name} ({recipe.hub_id} {recipe.weights})"
    try:
        if recipe.layout == "conch":
            from genpath.encoders.layouts import ConchVisionTower

            model = ConchVisionTower(**kwargs)
            state = model.fit_pos_embed(state)
        else:
            model = timm.create_model(recipe.arch, pretrained=False, **kwargs)
    except (TypeError, AssertionError, ValueError) as error:
        raise ValueError(f"overrides: expected arguments {recipe.arch} accepts, got {overrides} ({error})") from None
    if recipe.layout == "dinov2-hf":
        from genpath.encoders.layouts import dinov2_to_timm

        state = dinov2_to_timm(state, list(model.state_dict()), checkpoint_path)
    load_strict(model, state, "checkpoint_path", layout, checkpoint_path)
    size = input_size or recipe.input_size or kwargs["img_size"]
    return PublishedEncoder(model.float(), recipe, int(size))


def _register(name: str) -> None:
    def factory(checkpoint_path: str | None = None, input_size: int | None = None, **overrides: Any) -> ImageEncoder:
        return build_published(name, checkpoint_path, input_size, **overrides)

    factory.__doc__ = f"{name}: {RECIPES[name].hub_id} {RECIPES[name].weights} with its published recipe."
    register_encoder(name, weights_arg="checkpoint_path")(factory)


for _name in RECIPES:
    _register(_name)


def recipe_table(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per preset (name, hub id, file, licence, access, output dimension, source), for docs and ``--help``.

    Example:
        >>> [row["dim"] for row in recipe_table(["uni", "virchow2"])]
        [1024, 2560]
    """
    dims = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
            "phikon-v2": 1024, "conch-v1.5": 768}
    return [{"name": n, "hub_id": RECIPES[n].hub_id, "weights": RECIPES[n].weights, "licence": RECIPES[n].licence,
             "access": RECIPES[n].access, "dim": dims[n], "source": RECIPES[n].source} for n in (names or RECIPES)]
