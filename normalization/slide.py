"""Normalize a whole slide: the generic slide engine (:mod:`genpath.wsi`) with a stain normalizer plugged in.

A :class:`~normalization.base.StainNormalizer` is a :class:`~genpath.wsi.hooks.SlideFitter`:
the engine hands it tissue windows sampled over the whole slide at the working resolution,
it estimates the slide's source stain statistics *once* (:meth:`StainNormalizer.fit_slide`),
and every tile then goes through the same map (no seams by construction). Percentiles are
taken at the working resolution rather than on the thumbnail because downsampling averages
nuclei with stroma and shrinks them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from genpath.io.slide import SlideReader
from genpath.wsi import SlideOptions, SlideResult, process_slide, sample_tissue_windows, tissue_downsample
from normalization.base import StainNormalizer

__all__ = ["SlideOptions", "SlideResult", "normalize_slide", "slide_source_statistics", "tissue_downsample"]


def slide_source_statistics(
    reader: SlideReader,
    normalizer: StainNormalizer,
    mask: np.ndarray,
    mask_downsample: float,
    level: int,
    options: SlideOptions,
) -> dict[str, torch.Tensor] | None:
    """Estimate a slide's source statistics from tissue windows spread over the whole slide.

    Returns None when the slide has no usable tissue.
    """
    windows = sample_tissue_windows(reader, mask, mask_downsample, level, options)
    if windows is None:
        return None
    try:
        return normalizer.estimate_source(windows)
    except ValueError:
        return None


def normalize_slide(
    source: str | Path | SlideReader,
    output: str | Path,
    normalizer: torch.nn.Module,
    options: SlideOptions | None = None,
    mpp: float | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
    resume_key: str = "",
) -> SlideResult:
    """Normalize one slide into a pyramidal TIFF or OME-Zarr at ``output``.

    Same arguments as :func:`genpath.wsi.process_slide`, with ``normalizer`` a fitted
    :class:`StainNormalizer` (fitted per slide unless ``options.source == "tile"``) or any
    module mapping uint8 ``(B,3,h,w)`` windows to images.
    """
    return process_slide(source, output, normalizer, options, mpp=mpp, resume=resume, progress=progress,
                         device=device, resume_key=resume_key)
