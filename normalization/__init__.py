"""Stain normalization: classical batched normalizers and the stain-physics functions.

Methods that need genpath's diffusion pipelines (``stainfuser``) are plugins: they register
through the ``genpath.normalizers`` entry point, so ``build_normalizer("stainfuser", model=...)``
finds them without this package importing them.
"""

from normalization.base import StainNormalizer, available_methods, build_normalizer
from normalization.macenko import MacenkoNormalizer
from normalization.reinhard import ReinhardNormalizer
from normalization.vahadane import VahadaneNormalizer

__all__ = [
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainNormalizer",
    "VahadaneNormalizer",
    "available_methods",
    "build_normalizer",
]
