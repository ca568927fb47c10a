"""Reports a person reads: a self-contained ``report.html`` per batch, labelled grids, synth dataset cards.

Layer 0: nothing here knows about stains. Callers pass rows with generic fields (status,
error, thumbnails, colour swatches, numbers, output link); stain normalization builds its
swatches from its fitted state (:mod:`normalization.report`).

* :mod:`.html`: :class:`BatchReport` (the page, its ``report/`` thumbnails, rewritten atomically
  after each item), :class:`ReportRow`, :class:`ReportHeader`, :class:`Swatch`.
* :mod:`.slides`: :class:`SlideBatchReport`, rows from a slide batch's manifest and QC folders.
* :mod:`.grid`: :func:`labelled_grid` (augmentation and normalization previews, contact sheets).
* :mod:`.synth`: ``dataset_card.md``, the contact sheet and the report of a ``genpath synth`` run.
"""

from genpath.report.grid import labelled_grid, save_grid
from genpath.report.html import BatchReport, ReportHeader, ReportRow, Swatch, render_report
from genpath.report.slides import SlideBatchReport, read_qc_report, write_qc_report

__all__ = [
    "BatchReport",
    "ReportHeader",
    "ReportRow",
    "SlideBatchReport",
    "Swatch",
    "labelled_grid",
    "read_qc_report",
    "render_report",
    "save_grid",
    "write_qc_report",
]
