"""The generic whole-slide engine: slides in, any tile function through, pyramids out.

It knows nothing about stains. A *processor* is any callable mapping uint8 ``(B,3,h,w)``
windows to images; one that also has ``fit_slide(images, mask)`` (see :mod:`.hooks`) is first
given tissue windows of the slide and returns the tile function for that slide (how a stain
normalizer fits per-slide statistics, so every tile gets the same map).

* :mod:`.options`: :class:`SlideOptions` (tiling, tissue, output) and :class:`SlideResult`.
* :mod:`.engine`: :func:`process_slide`, one slide to a pyramidal TIFF or OME-Zarr.
* :mod:`.jobs`: inputs (files, folders, globs, CSV) to jobs; slide-vs-tile detection.
* :mod:`.batch`: one idempotent task per slide, a manifest with resume, local / process / dask executors.
* :mod:`.qc`: before/after and tissue-mask thumbnails.
"""

from genpath.wsi.batch import SlideBatchSettings, read_manifest, run_slide_batch, run_slide_job, write_manifest
from genpath.wsi.engine import process_slide, sample_tissue_windows, tissue_downsample
from genpath.wsi.hooks import SlideFitter, TileFunction, tile_function_for_slide
from genpath.wsi.jobs import expand_slides, inputs_hold_slides, is_slide_input, output_complete
from genpath.wsi.options import SlideOptions, SlideResult

__all__ = [
    "SlideBatchSettings",
    "SlideFitter",
    "SlideOptions",
    "SlideResult",
    "TileFunction",
    "expand_slides",
    "inputs_hold_slides",
    "is_slide_input",
    "output_complete",
    "process_slide",
    "read_manifest",
    "run_slide_batch",
    "run_slide_job",
    "sample_tissue_windows",
    "tile_function_for_slide",
    "tissue_downsample",
    "write_manifest",
]
