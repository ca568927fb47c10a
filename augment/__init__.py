"""Stain augmentation for training: pixel-space transforms and the shared parameter schema."""

from augment.params import PARAM_SCHEMA, ParamSpec, check_params, identity_params
from augment.stain import (
    RandomHEDJitter,
    RandomStainJitter,
    RandomStainNA,
    StainAugmentationBase,
    StainNAStatistics,
)

__all__ = [
    "PARAM_SCHEMA",
    "ParamSpec",
    "RandomHEDJitter",
    "RandomStainJitter",
    "RandomStainNA",
    "StainAugmentationBase",
    "StainNAStatistics",
    "check_params",
    "identity_params",
]
