"""H&E → IHC virtual staining: translator networks, their losses, paired data and DAB analysis.

The pipelines built on them (and the ``Translator`` module) are in :mod:`genpath.pipelines`.
"""

from genpath.translation.data import ImagePair, PairedCropDataset, pairs_from_layout, split_by_patient
from genpath.translation.stains import dab_correlation, dab_positive_fraction, looks_like_ihc, rgb_to_hdx
from genpath.translation.translator import LooksLikeIHCWarning, warn_if_looks_like_ihc

__all__ = [
    "ImagePair",
    "LooksLikeIHCWarning",
    "PairedCropDataset",
    "dab_correlation",
    "dab_positive_fraction",
    "looks_like_ihc",
    "pairs_from_layout",
    "rgb_to_hdx",
    "split_by_patient",
    "warn_if_looks_like_ihc",
]
