"""The report of a tile batch (``genpath normalize tiles``, ``genpath translate tiles``).

Rows are added as files finish, with their images still in memory (no re-reading): before,
after and an optional mask become small JPEGs in ``OUT/report/``. The page is rewritten at most
every ``interval`` seconds and on :meth:`TileBatchReport.flush`, like the tile manifest, so a
batch of 100,000 tiles does not rewrite a growing page 100,000 times; beyond ``max_rows`` rows
only failed ones get a row on the page (the manifest lists all). Rows an earlier run recorded
for inputs this run does not touch are kept, first, as the tile manifest keeps them.

Nothing here raises into the batch: a report that cannot be written (a full disk) is logged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpath.report.html import BatchReport, ReportHeader, ReportRow, Swatch
from genpath.utils.atomic import temporary_in_use
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
__all__ = ["TILE_VALUE_COLUMNS", "TileBatchReport", "run_settings_hash"]
TILE_VALUE_COLUMNS = (("tissue", "tissue %"), ("size", "size"), ("seconds", "seconds"))


def run_settings_hash(out: str | Path) -> str:
    """16 hex digits of the settings ``OUT/run.json`` records ("" when there is none)."""
    try:
        settings = json.loads((Path(out) / "run.json").read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return ""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16] if settings else ""


class TileBatchReport:
    """``OUT/report.html`` of a tile batch.

    Args:
        out: the output folder.
        header: title, fields and columns (value columns name keys of the rows' values).
        kept: inputs of earlier rows to keep (the tile manifest's kept rows); other earlier rows go.
        interval: seconds between page rewrites (:meth:`update`); :meth:`flush` always writes.
        max_rows: rows that get thumbnails and a place on the page (failed rows always do).
        thumbnail_size: longest side of the thumbnails.
    """

    def __init__(self, out: str | Path, header: ReportHeader, kept: Iterable[dict[str, Any]] = (),
                 interval: float = 5.0, max_rows: int = 5000, thumbnail_size: int = 96) -> None:
        self.report = BatchReport(out, header, interval=interval, max_rows=max_rows)
        self.size, self.added = thumbnail_size, 0
        kept = list(kept)
        self.report.retain(str(r.get("input", "")) for r in kept)
        for row in kept:  # earlier rows this report never saw (an older genpath): plain rows
            key = str(row.get("input", ""))
            if key and key not in self.report.rows:
                self.report.update(ReportRow(key=key, name=Path(key).name, status=str(row.get("status", "")),
                                             error=str(row.get("error") or ""), output=self.report.link(
                                                 row.get("output") if row.get("status") != "failed" else None)))
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Hidden temporaries a killed run left in ``OUT/report/`` (never those of a live run)."""
        assets = self.report.assets
        if not assets.is_dir():
            return
        try:
            for entry in os.scandir(assets):
                if entry.name.startswith(".") and entry.is_file() and not temporary_in_use(entry.path):
                    Path(entry.path).unlink(missing_ok=True)
        except OSError as error:
            logger.info("report: could not tidy %s: %s", assets, error)

    @property
    def wants_images(self) -> bool:
        """Whether the next rows still get thumbnails (the first ``max_rows`` rows do)."""
        return self.added < self.report.max_rows

    def add(self, record: dict[str, Any], images: dict[str, Any] | None = None,
            swatches: list[Swatch] | None = None, values: dict[str, Any] | None = None) -> None:
        """Add one file's row from its manifest ``record`` (``input``, ``status``, ``output``, ``error``).

        Args:
            record: the file's manifest record.
            images: column key -> image (tensor/array) to thumbnail (only for the first
                ``max_rows`` rows and for failed rows).
            swatches: colour swatches of the row.
            values: the row's value cells.
        """
        try:
            key = str(record["input"])
            status = str(record.get("status", ""))
            failed = status == "failed"
            thumbnails = {}
            if images and (self.added < self.report.max_rows or failed):
                for kind, image in images.items():
                    if image is not None:
                        thumbnails[kind] = self.report.thumbnail(key, kind, image, self.size)
            self.added += 1
            self.report.update(ReportRow(key=key, name=Path(key).name, status=status,
                                         error=str(record.get("error") or ""),
                                         output="" if failed else self.report.link(record.get("output")),
                                         images={k: v for k, v in thumbnails.items() if v},
                                         swatches=swatches or [], values=values or {}))
        except Exception as error:  # noqa: BLE001 - the report must never stop a batch
            logger.info("report: could not add %s: %s", record.get("input"), error)

    def update(self) -> None:
        """Rewrite the page if the last write is older than ``interval`` seconds."""
        self._write(force=False)

    def flush(self) -> Path | None:
        """Rewrite the page now."""
        return self._write(force=True)

    def _write(self, force: bool) -> Path | None:
        try:
            return self.report.write(force=force)
        except Exception as error:  # noqa: BLE001 - a full disk must not turn into a traceback
            logger.warning("report: could not write %s: %s", self.report.path, error)
            return None
