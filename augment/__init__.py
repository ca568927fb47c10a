"""Augmentation for training: pixel-space transforms, the shared parameter schema and HistAug.

HistAug (feature-space augmentation) is imported lazily: it needs diffusers.
"""

from typing import Any

from augment.histology import RandomHistologyTransform
from augment.params import PARAM_SCHEMA, ParamSpec, check_params, identity_params
from augment.sampling import AugmentationSampler
from augment.stain import (
    RandomHEDJitter,
    RandomStainJitter,
    RandomStainNA,
    StainAugmentationBase,
    StainNAStatistics,
)

_LAZY = {"HistAugModel": "augment.histaug", "HistAugTransform": "augment.feature",
         "HistAugCollate": "augment.feature"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'augment' has no attribute {name!r}")


__all__ = [
    "PARAM_SCHEMA",
    "AugmentationSampler",
    "HistAugCollate",
    "HistAugModel",
    "HistAugTransform",
    "RandomHistologyTransform",
    "ParamSpec",
    "RandomHEDJitter",
    "RandomStainJitter",
    "RandomStainNA",
    "StainAugmentationBase",
    "StainNAStatistics",
    "check_params",
    "identity_params",
]
