"""Stain normalization: classical batched normalizers and the stain-physics functions."""

from normalization.base import StainNormalizer, available_methods, build_normalizer
from normalization.macenko import MacenkoNormalizer
from normalization.reinhard import ReinhardNormalizer
from normalization.stainfuser import StainFuserNormalizer
from normalization.vahadane import VahadaneNormalizer

__all__ = [
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainFuserNormalizer",
    "StainNormalizer",
    "VahadaneNormalizer",
    "available_methods",
    "build_normalizer",
]
