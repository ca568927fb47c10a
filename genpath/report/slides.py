"""The report of a slide batch: rows from ``manifest.csv`` and each slide's ``<output>.qc/`` folder.

The slide engine writes ``<output>.qc/before_after.png`` (before | 8 px gap | after, see
:mod:`genpath.wsi.qc`) and ``tissue_mask.png``; a processor may add ``<output>.qc/report.json``
with generic row parts (``{"swatches": [{"label", "rgb", "title"}], "values": {...},
"header_swatches": [...]}``), which is how stain normalization shows each slide's fitted stain
vectors without this layer knowing about stains. :meth:`SlideBatchReport.refresh` rereads the
manifest and rebuilds only rows whose manifest entry changed, then rewrites the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from genpath.report.html import BatchReport, ReportHeader, ReportRow, Swatch
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
__all__ = ["QC_REPORT", "SLIDE_VALUE_COLUMNS", "SlideBatchReport", "read_qc_report", "write_qc_report"]
#: the per-slide file a processor may write into ``<output>.qc/``
QC_REPORT = "report.json"
#: white columns between the halves of ``before_after.png`` (:func:`genpath.wsi.qc.write_qc`)
QC_GAP = 8
SLIDE_VALUE_COLUMNS = (("tissue", "tissue %"), ("tiles", "tiles"), ("tissue_tiles", "tissue tiles"),
                       ("size", "size"), ("mpp", "mpp"), ("seconds", "seconds"))
_STAMP_FIELDS = ("status", "error", "output", "config_hash", "seconds", "tiles")


def qc_folder(output: str | Path) -> Path:
    """``<output>.qc`` beside a slide output."""
    output = Path(output)
    return output.with_name(output.name + ".qc")


def write_qc_report(output: str | Path, swatches: list[Swatch], values: dict[str, Any] | None = None,
                    header_swatches: list[Swatch] | None = None) -> Path:
    """Write ``<output>.qc/report.json`` (row swatches, values, header swatches) atomically."""
    from dataclasses import asdict

    from genpath.utils.atomic import atomic_write_json

    data = {"swatches": [asdict(s) for s in swatches], "values": values or {},
            "header_swatches": [asdict(s) for s in header_swatches or []]}
    return atomic_write_json(qc_folder(output) / QC_REPORT, data)


def read_qc_report(output: str | Path) -> dict[str, Any]:
    """Read ``<output>.qc/report.json`` as ``{"swatches": [Swatch], "values": {}, "header_swatches": [Swatch]}``."""
    path = qc_folder(output) / QC_REPORT
    empty: dict[str, Any] = {"swatches": [], "values": {}, "header_swatches": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"swatches": [Swatch(s["label"], tuple(s["rgb"]), s.get("title", "")) for s in data["swatches"]],
                "values": dict(data.get("values", {})),
                "header_swatches": [Swatch(s["label"], tuple(s["rgb"]), s.get("title", ""))
                                    for s in data.get("header_swatches", [])]}
    except FileNotFoundError:
        return empty
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.info("report: ignoring %s: %s", path, error)
        return empty


def _number(value: Any) -> float | int | str:
    if value in (None, ""):
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(number) if number.is_integer() else number


class SlideBatchReport:
    """``OUT/report.html`` of a slide batch, kept in step with ``OUT/manifest.csv``.

    Args:
        out: the batch folder.
        header: title, fields (method, config hash, version...) and target thumbnails; its value
            columns name keys of the rows' values (:data:`SLIDE_VALUE_COLUMNS` fits slides).
        thumbnail_size: longest side of row thumbnails.
    """

    def __init__(self, out: str | Path, header: ReportHeader, thumbnail_size: int = 160) -> None:
        self.report = BatchReport(out, header)
        self.out, self.size = Path(out), thumbnail_size

    def _fresh(self, relative: str, source: Path) -> bool:
        target = self.out / relative
        return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime

    def _thumbnails(self, key: str, output: Path) -> dict[str, str]:
        from PIL import Image

        folder = qc_folder(output)
        pair, mask = folder / "before_after.png", folder / "tissue_mask.png"
        images: dict[str, str] = {}
        if pair.is_file():
            names = {kind: self.report.asset_name(key, kind) for kind in ("before", "after")}
            if all(self._fresh(n, pair) for n in names.values()):
                images.update(names)
            else:
                try:
                    array = np.asarray(Image.open(pair).convert("RGB"))
                    half = (array.shape[1] - QC_GAP) // 2
                    images["before"] = self.report.thumbnail(key, "before", array[:, :half], self.size)
                    images["after"] = self.report.thumbnail(key, "after", array[:, half + QC_GAP:], self.size)
                except (OSError, ValueError) as error:
                    logger.info("report: unreadable %s: %s", pair, error)
        if mask.is_file():
            name = self.report.asset_name(key, "mask")
            images["mask"] = name if self._fresh(name, mask) else self.report.thumbnail(key, "mask", mask, self.size)
        return {k: v for k, v in images.items() if v}

    def _tissue_share(self, output: Path) -> float | str:
        from PIL import Image

        mask = qc_folder(output) / "tissue_mask.png"
        try:
            return round(100.0 * float((np.asarray(Image.open(mask).convert("L")) > 127).mean()), 1)
        except (OSError, ValueError):
            return ""

    def build_row(self, entry: dict[str, Any]) -> ReportRow:
        """One report row from one manifest row (thumbnails from the slide's QC folder)."""
        key, status = str(entry.get("input", "")), str(entry.get("status", ""))
        output = Path(str(entry.get("output") or ""))
        done = status != "failed" and bool(entry.get("output")) and output.exists()
        extra = read_qc_report(output) if done else {"swatches": [], "values": {}, "header_swatches": []}
        width, height = entry.get("width"), entry.get("height")
        values = {"tiles": _number(entry.get("tiles")), "tissue_tiles": _number(entry.get("tissue_tiles")),
                  "mpp": _number(entry.get("mpp")), "seconds": _number(entry.get("seconds")),
                  "size": f"{width}x{height}" if width and height else "",
                  "tissue": self._tissue_share(output) if done else "", **extra["values"]}
        stamp = json.dumps([str(entry.get(k, "")) for k in _STAMP_FIELDS])
        row = ReportRow(key=key, name=Path(key).name, status=status, error=str(entry.get("error") or ""),
                        output=self.report.link(output) if done else "",
                        images=self._thumbnails(key, output) if done else {}, swatches=extra["swatches"],
                        values=values, stamp=stamp)
        if extra["header_swatches"] and not self.report.header.swatches:
            self.report.header.swatches = extra["header_swatches"]
        return row

    def refresh(self, manifest_rows: list[dict[str, Any]] | None = None) -> Path | None:
        """Reread ``manifest.csv`` (or take ``manifest_rows``), rebuild changed rows, rewrite the page.

        Never raises: a report problem is logged and the batch goes on.
        """
        try:
            if manifest_rows is None:
                from genpath.wsi.batch import read_manifest

                manifest_rows = read_manifest(self.out / "manifest.csv")
            for entry in manifest_rows:
                key = str(entry.get("input", ""))
                stamp = json.dumps([str(entry.get(k, "")) for k in _STAMP_FIELDS])
                old = self.report.rows.get(key)
                if old is None or old.stamp != stamp or not all((self.out / p).is_file() for p in old.images.values()):
                    self.report.update(self.build_row(entry))
            self.report.retain(str(e.get("input", "")) for e in manifest_rows)
            return self.report.write()
        except Exception as error:  # noqa: BLE001 - the report must never stop a batch
            logger.warning("report: could not update %s: %s", self.report.path, error)
            return None
