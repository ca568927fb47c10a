"""How a processor plugs into the slide engine: a tile function, optionally fitted per slide.

* A **tile function** maps uint8 ``(B,3,h,w)`` windows to images of the same shape (uint8, or
  float in [0, 1]). Any ``nn.Module`` or callable qualifies (a translator, a toy inverter).
* A **slide fitter** also has ``fit_slide(images, mask=None)``: the engine hands it tissue
  windows of the slide at the working resolution (``mask`` None), or the low-resolution
  tissue-detection image with its mask (``fit_on="thumbnail"``), and it returns the tile
  function for that slide, or None to be called as it is (no usable statistics). A stain
  normalizer fits the slide's source stains here, so every tile of the slide gets the same map.
  A fitter whose ``fits_slides`` attribute is False (a neural normalizer without slide
  statistics) is not given any windows: nothing is read for it.

Example:
    >>> import torch
    >>> class Scale:
    ...     def __call__(self, windows):
    ...         return windows
    ...     def fit_slide(self, images, mask=None):
    ...         mean = images.float().mean()
    ...         return lambda windows: (windows.float() / mean).clamp(0, 1)
    >>> fn = tile_function_for_slide(Scale(), torch.full((1, 3, 4, 4), 128, dtype=torch.uint8), None)
    >>> fn(torch.full((1, 3, 2, 2), 64, dtype=torch.uint8)).max().item()
    0.5
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

TileFunction = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class SlideFitter(Protocol):
    """A processor that fits per-slide state before its tiles are processed."""

    def __call__(self, windows: torch.Tensor) -> torch.Tensor: ...

    def fit_slide(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> TileFunction | None:
        """Return the tile function for one slide (None: use the processor as it is)."""
        ...


def tile_function_for_slide(
    processor: TileFunction, images: torch.Tensor | None, mask: torch.Tensor | None
) -> TileFunction:
    """Return the tile function to stream a slide through.

    Args:
        processor: a tile function, or a :class:`SlideFitter`.
        images: tissue windows ``(B,3,h,w)`` or the tissue-detection image ``(3,h,w)``, uint8;
            None when the slide has no usable tissue or per-slide fitting is off.
        mask: the tissue mask of a ``(3,h,w)`` ``images``, else None.

    Returns:
        ``processor.fit_slide(images, mask)`` when the processor is a slide fitter and it
        returned a function, else ``processor`` itself.
    """
    if images is None or not isinstance(processor, SlideFitter):
        return processor
    fitted = processor.fit_slide(images, mask)
    return processor if fitted is None else fitted
