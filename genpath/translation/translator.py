"""Input checks shared by the H&E→IHC translators: warn when an input looks like IHC already.

The :class:`~genpath.pipelines.translator.Translator` module (load a translator folder,
translate tiles or slides) lives with the pipelines it wraps, in :mod:`genpath.pipelines`.
"""

from __future__ import annotations

import warnings

import torch

from genpath.translation.stains import brown_share


class LooksLikeIHCWarning(UserWarning):
    """An input to an H&E→IHC translator looks like DAB IHC already."""


def warn_if_looks_like_ihc(rgb: torch.Tensor, threshold: float | None, stacklevel: int = 2) -> list[int]:
    """Warn (:class:`LooksLikeIHCWarning`) about images whose brown (DAB) share exceeds ``threshold``.

    Args:
        rgb: float RGB ``(B,3,H,W)`` in [0, 1].
        threshold: brown share of coloured pixels above which an image looks like IHC; None: no check.
        stacklevel: passed to ``warnings.warn`` (2: the caller of this function).

    Returns:
        The indices of the flagged images.

    Example:
        >>> warn_if_looks_like_ihc(torch.ones(1, 3, 8, 8), 0.4)
        []
    """
    if threshold is None:
        return []
    share = brown_share(rgb)
    flagged = (share > threshold).nonzero().flatten().tolist()
    if flagged:
        warnings.warn(
            f"images: expected H&E input, got {len(flagged)} image(s) that look like DAB IHC already "
            f"(brown share {share[flagged[0]]:.2f} > {threshold}; indices {flagged[:8]}); translating anyway",
            LooksLikeIHCWarning, stacklevel=stacklevel + 1)
    return flagged
