"""Augmentation for training: pixel-space transforms, the shared parameter schema and HistAug.

HistAug (feature-space augmentation) is imported lazily: it needs diffusers.

kornia is imported first, through :func:`genpath.utils.quiet_imports.import_kornia` (before
``normalization.functional`` imports it), so ``import augment`` prints no kornia import-time warning.
"""

from typing import Any

from genpath.utils.quiet_imports import import_kornia

import_kornia()

from augment.histology import RandomHistologyTransform  # noqa: E402
from augment.params import PARAM_SCHEMA, ParamSpec, check_params, identity_params  # noqa: E402
from augment.preview import preview_grid  # noqa: E402
from augment.sampling import AugmentationSampler  # noqa: E402
from augment.stain import (  # noqa: E402
    RandomHEDJitter,
    RandomStainJitter,
    RandomStainNA,
    StainAugmentationBase,
    StainNAStatistics,
)

_LAZY = {"HistAugModel": "augment.histaug", "HistAugTransform": "augment.feature",
         "HistAugCollate": "augment.feature", "load_histaug": "augment.feature",
         "OfficialHistAugModel": "augment.histaug_official", "load_official_histaug": "augment.histaug_official",
         "to_official_params": "augment.histaug_translate"}


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
    "OfficialHistAugModel",
    "RandomHistologyTransform",
    "ParamSpec",
    "RandomHEDJitter",
    "RandomStainJitter",
    "RandomStainNA",
    "StainAugmentationBase",
    "StainNAStatistics",
    "check_params",
    "identity_params",
    "load_histaug",
    "load_official_histaug",
    "preview_grid",
    "to_official_params",
]
