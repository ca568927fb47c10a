"""H&E → IHC virtual staining: translators, their losses, paired data and DAB analysis."""

from genpath.translation.data import ImagePair, PairedCropDataset, pairs_from_layout, split_by_patient
from genpath.translation.stains import dab_correlation, dab_positive_fraction, looks_like_ihc, rgb_to_hdx
from genpath.translation.translator import LooksLikeIHCWarning, Translator, load_translation_pipeline

__all__ = [
    "ImagePair",
    "LooksLikeIHCWarning",
    "PairedCropDataset",
    "Translator",
    "dab_correlation",
    "dab_positive_fraction",
    "load_translation_pipeline",
    "looks_like_ihc",
    "pairs_from_layout",
    "rgb_to_hdx",
    "split_by_patient",
]
