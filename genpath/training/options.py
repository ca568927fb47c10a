"""Typed ``options`` of each trainer, and the registry of ``genpath train KIND``.

Each trainer's ``options`` block (YAML) is checked against its dataclass here: a misspelt key
or a value of the wrong type is a one-line error, not a silent default. Defaults live in the
dataclasses; :func:`resolve_options` returns the block with every default filled in, which is
what the trainer reads.

Example:
    >>> resolve_options("vae", {"kl_weight": 1e-5})["ssim_weight"]
    0.2
    >>> resolve_options("vae", {"kl_wieght": 1e-5})
    Traceback (most recent call last):
    ...
    ValueError: options (vae): unknown keys ['kl_wieght']; expected some of ['kl_weight', 'ssim_weight']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from genpath.config import check_types


@dataclass
class EncoderOptions:
    """SimCLR encoder: ``temperature`` of the NT-Xent loss."""

    temperature: float = 0.2


@dataclass
class VAEOptions:
    """VAE: weights of the KL and SSIM terms (besides L1)."""

    kl_weight: float = 1e-6
    ssim_weight: float = 0.2


@dataclass
class LDMOptions:
    """Embedding-conditioned LDM: frozen ``vae`` folder, registered ``encoder`` (+ kwargs), conditioning."""

    vae: str | None = None
    encoder: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    num_tokens: int = 4
    projector_hidden: int = 256
    cond_dropout: float = 0.1


@dataclass
class HistAugOptions:
    """HistAug: the frozen registered ``encoder``, the sampled transform family, the loss mix."""

    encoder: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[str] | None = None
    ranges: dict[str, Any] | None = None
    max_radius: int | None = None
    p_each: float | None = None
    cosine_weight: float = 1.0


@dataclass
class StainFuserOptions:
    """Diffusion stain normalizer: frozen ``vae``, optional ``init`` pipeline, simulator and real ``pairs``."""

    vae: str | None = None
    init: str | None = None
    max_tokens: int = 256
    simulator: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] | None = None


@dataclass
class StainFuserDistillOptions:
    """One-step student of a trained StainTransferPipeline ``teacher``: targets from ``teacher_steps`` DDIM steps."""

    teacher: str | None = None
    teacher_steps: int = 20
    simulator: dict[str, Any] = field(default_factory=dict)
    target_weight: float = 0.0
    cache_samples: int = 0


@dataclass
class ControlNetOptions:
    """Nuclei-mask ControlNet over a frozen LDM ``pipeline``.

    ``init`` continues a trained ControlNet; ``consistency_weight`` weighs the segmentation-consistency
    loss (0: off; see :mod:`genpath.training.controlnet`).
    """

    pipeline: str | None = None
    num_types: int = 0
    cond_dropout: float = 0.1
    init: str | None = None
    consistency_weight: float = 0.0


@dataclass
class TranslatorOptions:
    """H&E to IHC: ``kind`` ``gan`` (ASP losses; weights below) or ``diffusion`` (needs ``vae``)."""

    kind: str = "gan"
    vae: str | None = None
    generator: dict[str, Any] = field(default_factory=dict)
    discriminator: dict[str, Any] = field(default_factory=dict)
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    lambda_asp: float = 1.0
    lambda_pyramid: float = 10.0
    pyramid_levels: int = 4
    num_patches: int = 64
    asp_schedule: str = "lambda"
    asp_lookup: str = "linear"
    nce_temperature: float = 0.07


@dataclass(frozen=True)
class TrainerSpec:
    """One ``genpath train KIND``.

    Attributes:
        function: the trainer, ``module:function``.
        options: its typed options dataclass.
        example: an example config.
        summary: one line for ``--help``.
        model: the class (``module:Class``) whose constructor takes the ``model:`` block;
            ``translator`` picks by ``options.kind`` (``gan`` / ``diffusion``); None: no block.
        model_defaults: the trainer's own defaults for that class (``module:NAME`` of a dict),
            under the user's block when the block is checked.
    """

    function: str
    options: type
    example: str
    summary: str
    model: str | dict[str, str] | None = None
    model_defaults: str | dict[str, str] | None = None


TRAINERS: dict[str, TrainerSpec] = {
    "encoder": TrainerSpec("genpath.training.encoder:train_encoder", EncoderOptions, "configs/encoder_small.yaml",
                           "Train the small SimCLR histology encoder.",
                           "genpath.encoders.small_cnn:SmallHistologyEncoder"),
    "vae": TrainerSpec("genpath.training.vae:train_vae", VAEOptions, "configs/vae_small.yaml",
                       "Train the VAE (diffusers AutoencoderKL).", "diffusers:AutoencoderKL"),
    "ldm": TrainerSpec("genpath.training.ldm:train_ldm", LDMOptions, "configs/ldm_small.yaml",
                       "Train the embedding-conditioned latent diffusion model (saves an EmbeddingToImagePipeline).",
                       "diffusers:UNet2DConditionModel", "genpath.training.ldm:SMALL_UNET"),
    "histaug": TrainerSpec("genpath.training.histaug:train_histaug", HistAugOptions, "configs/histaug_small.yaml",
                           "Train HistAug (feature-space augmentation) for a frozen registered encoder.",
                           "augment.histaug:HistAugModel"),
    "stainfuser": TrainerSpec("genpath.training.stainfuser:train_stainfuser", StainFuserOptions,
                              "configs/stainfuser_small.yaml",
                              "Train the diffusion stain normalizer on restaining-simulator triplets.",
                              "diffusers:UNet2DConditionModel", "genpath.training.stainfuser:STAINFUSER_UNET"),
    "stainfuser-distill": TrainerSpec("genpath.training.distill:train_stainfuser_distill", StainFuserDistillOptions,
                                      "configs/stainfuser_1step.yaml",
                                      "Distil a trained diffusion stain normalizer into a one-step student."),
    "controlnet": TrainerSpec("genpath.training.controlnet:train_controlnet", ControlNetOptions,
                              "configs/controlnet_hgsc.yaml",
                              "Train the nuclei-mask ControlNet on a frozen LDM (saves a MaskToImagePipeline)."),
    "translator": TrainerSpec("genpath.training.translator:train_translator", TranslatorOptions,
                              "configs/translator_bci_gan.yaml",
                              "Train an H&E->IHC translator on registered pairs (options.kind: gan or diffusion).",
                              {"gan": "genpath.translation.networks:ResnetTranslator",
                               "diffusion": "diffusers:UNet2DModel"},
                              {"diffusion": "genpath.training.translator:TRANSLATION_UNET"}),
}


#: Allowed ranges of numeric options (None: unbounded); comparisons written so NaN fails.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "num_tokens": (1, 1024), "projector_hidden": (1, None), "max_tokens": (1, None), "num_types": (0, 64),
    "num_patches": (1, None), "pyramid_levels": (1, 16), "max_radius": (0, 32), "cond_dropout": (0, 1),
    "p_each": (0, 1), "temperature": (1e-6, None), "nce_temperature": (1e-6, None), "kl_weight": (0, None),
    "ssim_weight": (0, None), "cosine_weight": (0, None), "lambda_gan": (0, None), "lambda_nce": (0, None),
    "lambda_asp": (0, None), "lambda_pyramid": (0, None), "teacher_steps": (1, 1000), "target_weight": (0, None),
    "cache_samples": (0, None), "consistency_weight": (0, None),
}


def resolve_options(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a trainer's ``options`` block against its dataclass and fill in the defaults.

    Keys left at None by the dataclass (and not given) are dropped, so trainers can still test
    ``"vae" in options`` for required settings and name them in their own errors.

    Raises:
        ValueError: unknown trainer, unknown key, wrong type or NaN (one line, naming it).
    """
    if kind not in TRAINERS:
        raise ValueError(f"kind: expected one of {sorted(TRAINERS)}, got {kind!r}")
    cls = TRAINERS[kind].options
    options = check_types(cls, options, f"options ({kind})")
    for key, value in options.items():
        low, high = RANGES.get(key, (None, None))
        if value is None or (low is None and high is None):
            continue
        if not ((low is None or value >= low) and (high is None or value <= high)):
            raise ValueError(f"options.{key}: expected a value in [{low}, {high if high is not None else 'inf'}] "
                             f"for {kind}, got {value}")
    resolved = dataclasses.asdict(cls(**options))
    return {k: v for k, v in resolved.items() if v is not None or k in options}


def check_model_block(kind: str, model: dict[str, Any], options: dict[str, Any]) -> None:
    """Check the ``model:`` block's keys against the constructor of the class the trainer builds.

    Raises:
        ValueError: a key the class does not take, or a block for a trainer that builds no model
            from it (one line, naming the keys and the class).
    """
    import importlib
    import inspect

    spec = TRAINERS[kind].model
    if isinstance(spec, dict):
        spec = spec.get(options.get("kind", "gan"))
    if spec is None:
        if model:
            raise ValueError(f"model: expected no 'model' block for {kind} (it is built from options), "
                             f"got keys {sorted(model)}")
        return
    module, name = spec.split(":")
    cls = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(model) - set(parameters) - {"self"})
    if unknown:
        raise ValueError(f"model: unknown keys {unknown} for {name}; expected some of "
                         f"{sorted(set(parameters) - {'self'})}")
    import torch

    defaults: dict[str, Any] = {}
    spec_defaults = TRAINERS[kind].model_defaults
    if isinstance(spec_defaults, dict):
        spec_defaults = spec_defaults.get(options.get("kind", "gan"))
    if spec_defaults:
        module_name, attribute = spec_defaults.split(":")
        defaults = dict(getattr(importlib.import_module(module_name), attribute))
    import warnings

    try:  # build it on the meta device: no memory, but every shape and argument is checked
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "zero-element tensors": the error below says what is wrong
            cls(**{**defaults, **model})
    except (ValueError, TypeError, RuntimeError, AssertionError, KeyError, IndexError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"model: expected a valid {name} configuration, got {first[:200]}") from None

