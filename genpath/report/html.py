"""One self-contained ``report.html`` per batch: rows of generic fields rendered as a sortable table.

The page has no external resources (inline CSS, a few lines of vanilla JavaScript for sorting
and filtering, no CDN); thumbnails are small JPEGs in ``report/`` next to it, linked relatively,
so a report of 1,000 slides stays light and opens offline. Nothing here knows about stains: a
caller passes rows with a status, an error, thumbnails, colour swatches (label, RGB, tooltip),
numbers and an output link.

:class:`BatchReport` keeps the rows (``report/rows.json``, so a rerun keeps earlier rows) and
rewrites the page atomically after each item (or at most every ``interval`` seconds).

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> report = BatchReport(folder, ReportHeader(title="demo", fields={"method": "macenko"}))
    >>> report.update(ReportRow(key="a.png", name="a.png", status="failed", error="unreadable"))
    >>> report.write().name
    'report.html'
    >>> 'class="failed"' in (folder / "report.html").read_text()
    True
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genpath.utils.atomic import atomic_write_json, atomic_write_text
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
__all__ = ["BatchReport", "ReportHeader", "ReportRow", "Swatch", "render_report"]
FAILED = "failed"
#: statuses drawn as failures (red rows)
FAILED_STATUSES = ("failed", "error")


@dataclass
class Swatch:
    """A small colour square: ``label`` under it, ``title`` as its tooltip."""

    label: str
    rgb: tuple[int, int, int]
    title: str = ""

    def __post_init__(self) -> None:
        self.rgb = tuple(int(min(255, max(0, round(float(c))))) if math.isfinite(float(c)) else 0
                         for c in self.rgb)  # type: ignore[assignment]
        if len(self.rgb) != 3:
            raise ValueError(f"rgb: expected three channel values, got {self.rgb}")


@dataclass
class ReportRow:
    """One input of a batch.

    Attributes:
        key: unique id of the row (the input path).
        name: what the first column shows.
        status: ``done``, ``normalized``, ``failed``... (``failed``/``error`` rows are red).
        error: the error message of a failed row.
        output: path of the output, relative to the report's folder (a link), or "".
        images: column key -> thumbnail path relative to the report's folder.
        swatches: colour swatches (e.g. fitted stain vectors).
        values: column key -> number or text (tissue fraction, tiles, seconds...); NaN/inf become None.
        stamp: what the row was built from (a caller rebuilds the row when it changes).
    """

    key: str
    name: str
    status: str
    error: str = ""
    output: str = ""
    images: dict[str, str] = field(default_factory=dict)
    swatches: list[Swatch] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    stamp: str = ""

    def __post_init__(self) -> None:
        self.values = {k: _clean(v) for k, v in self.values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportRow:
        swatches = [Swatch(s["label"], tuple(s["rgb"]), s.get("title", "")) for s in data.get("swatches", [])]
        return cls(**{**data, "swatches": swatches})

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES


@dataclass
class ReportHeader:
    """The page header: title, key/value fields, target thumbnails and swatches, and the columns.

    Attributes:
        title: page title (``genpath normalize slides``).
        fields: shown in order (method, config hash, version, ...).
        images: label -> thumbnail path relative to the report's folder (the target).
        swatches: header swatches (the target's stain vectors).
        image_columns: ``(key, title)`` of the thumbnail columns, in order.
        value_columns: ``(key, title)`` of the value columns, in order.
        swatch_title: title of the swatch column ("" hides it).
        notes: free lines shown under the header.
    """

    title: str
    fields: dict[str, Any] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    swatches: list[Swatch] = field(default_factory=list)
    image_columns: Sequence[tuple[str, str]] = (("before", "before"), ("after", "after"), ("mask", "tissue"))
    value_columns: Sequence[tuple[str, str]] = (("tissue", "tissue %"), ("tiles", "tiles"),
                                                ("seconds", "seconds"))
    swatch_title: str = "stains"
    notes: list[str] = field(default_factory=list)


_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:18px;margin:0 0 8px}
.head{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap;margin-bottom:10px}
.meta td{padding:1px 8px 1px 0;vertical-align:top}.meta td:first-child{color:#666}
.controls{margin:8px 0;display:flex;gap:8px;align-items:center}
table.rows{border-collapse:collapse;width:100%}
table.rows th{background:#eee;position:sticky;top:0;cursor:pointer;text-align:left;padding:4px;
border-bottom:2px solid #ccc;user-select:none}
table.rows td{padding:3px 4px;border-bottom:1px solid #ddd;vertical-align:top}
table.rows td:first-child,table.rows td:last-child{max-width:200px;overflow-wrap:anywhere}
tr.failed td{background:#fde0e0}tr.failed .status{color:#b00;font-weight:600}
.error{color:#b00;font-size:12px;max-width:640px;overflow-wrap:anywhere}
img.thumb{max-width:140px;max-height:140px;display:block;border:1px solid #ccc}
.sw{display:inline-block;text-align:center;margin:0 3px 3px 0;font-size:10px;color:#555}
.sw span{display:block;width:22px;height:22px;border:1px solid #999;margin:auto}
td.sws{white-space:nowrap}
.num{text-align:right;font-variant-numeric:tabular-nums}
th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}
.note{color:#666}
"""

_JS = """
(function(){function key(r,i){var c=r.querySelector('td[data-col="'+i+'"]');return c?c.dataset.sort:'';}
var t=document.getElementById('rows'),b=t.tBodies[0],f=document.getElementById('filter'),
s=document.getElementById('status'),c=document.getElementById('count');
function apply(){var q=f.value.toLowerCase(),st=s.value,n=0;
for(var r of b.rows){var ok=(!q||r.textContent.toLowerCase().indexOf(q)>=0)&&(!st||r.dataset.status===st);
r.style.display=ok?'':'none';if(ok)n++;}c.textContent=n+' of '+b.rows.length+' rows';}
f.addEventListener('input',apply);s.addEventListener('change',apply);
Array.from(t.tHead.rows[0].cells).forEach(function(h,i){h.addEventListener('click',function(){
var asc=!h.classList.contains('asc');
Array.from(h.parentNode.cells).forEach(function(x){x.classList.remove('asc','desc');});
h.classList.add(asc?'asc':'desc');var rows=Array.from(b.rows);rows.sort(function(x,y){
var a=key(x,i),z=key(y,i),na=parseFloat(a),nz=parseFloat(z);
var r=(!isNaN(na)&&!isNaN(nz))?na-nz:String(a).localeCompare(String(z));return asc?r:-r;});
rows.forEach(function(r){b.appendChild(r);});});});apply();})();
"""


def _clean(value: Any) -> Any:
    """Make a cell JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _href(path: str) -> str:
    """Quote a relative link: percent-encode what a URL path cannot hold (spaces, #, ?), keep slashes."""
    from urllib.parse import quote

    return _e(quote(path.replace(os.sep, "/"), safe="/._-~"))


def _format(value: Any) -> tuple[str, str]:
    """``(shown, sort key)`` of a value cell."""
    if value is None or value == "":
        return "", ""
    if isinstance(value, bool):
        return str(value), str(int(value))
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            return str(value), ""
        shown = f"{int(number)}" if number == int(number) and abs(number) < 1e15 else f"{number:.3g}"
        return shown, repr(number)
    return str(value), str(value)


def _swatches(swatches: Iterable[Swatch]) -> str:
    return "".join(f'<span class="sw" title="{_e(s.title or s.label)}"><span style="background:rgb'
                   f'({s.rgb[0]},{s.rgb[1]},{s.rgb[2]})"></span>{_e(s.label)}</span>' for s in swatches)


def render_report(header: ReportHeader, rows: Sequence[ReportRow], hidden: int = 0) -> str:
    """Render the page (a string of HTML5). ``hidden``: rows left out to keep the page light (noted)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    seconds = sum(float(r.values["seconds"]) for r in rows
                  if isinstance(r.values.get("seconds"), int | float) and math.isfinite(float(r.values["seconds"])))
    total = len(rows) + hidden
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    fields = {**header.fields, "rows": f"{total} ({summary})" if summary else "0"}
    if any(key == "seconds" for key, _ in header.value_columns):
        fields["seconds (sum)"] = f"{seconds:.1f}"
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in fields.items())
    images = "".join(f'<figure style="margin:0"><img class="thumb" alt="{_e(label)}" src="{_href(src)}">'
                     f"<figcaption>{_e(label)}</figcaption></figure>" for label, src in header.images.items())
    head_swatches = f"<div>{_swatches(header.swatches)}</div>" if header.swatches else ""
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in header.notes)
    if hidden:
        notes += f'<p class="note">{hidden} rows not shown (failed rows always are); the manifest lists all.</p>'
    columns = ["name", "status", *(t for _, t in header.image_columns)]
    columns += [header.swatch_title] if header.swatch_title else []
    columns += [t for _, t in header.value_columns] + ["output"]
    thead = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = []
    spanned = len(header.image_columns) + (1 if header.swatch_title else 0)
    for row in rows:
        cells = [f'<td data-col="0" data-sort="{_e(row.name)}">{_e(row.name)}</td>',
                 f'<td data-col="1" class="status" data-sort="{_e(row.status)}">{_e(row.status)}</td>']
        column = 2
        if row.error and spanned:  # the error takes the room of the thumbnails (a failed row has none)
            cells.append(f'<td colspan="{spanned}"><div class="error">{_e(row.error)}</div></td>')
            column += spanned
        else:
            for key, title in header.image_columns:
                src = row.images.get(key)
                image = (f'<img class="thumb" loading="lazy" alt="{_e(title)}" src="{_href(src)}">' if src else "")
                cells.append(f'<td data-col="{column}" data-sort="">{image}</td>')
                column += 1
            if header.swatch_title:
                cells.append(f'<td data-col="{column}" class="sws" data-sort="">{_swatches(row.swatches)}</td>')
                column += 1
        for key, _ in header.value_columns:
            shown, sort = _format(row.values.get(key))
            cells.append(f'<td data-col="{column}" class="num" data-sort="{_e(sort)}">{_e(shown)}</td>')
            column += 1
        link = f'<a href="{_href(row.output)}">{_e(Path(row.output).name)}</a>' if row.output else ""
        cells.append(f'<td data-col="{column}" data-sort="{_e(row.output)}">{link}</td>')
        status_class = FAILED if row.failed else _e(re.sub(r"[^a-z0-9_-]", "", row.status.lower()))
        body.append(f'<tr class="{status_class}" data-status="{_e(row.status)}" data-key="{_e(row.key)}">'
                    + "".join(cells) + "</tr>")
    options = "".join(f'<option value="{_e(s)}">{_e(s)} ({n})</option>' for s, n in sorted(counts.items()))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(header.title)}</title>"
        f"<style>{_CSS}</style></head><body>\n<h1>{_e(header.title)}</h1>\n"
        f'<div class="head"><table class="meta">{meta}</table>{images}{head_swatches}</div>{notes}\n'
        '<div class="controls"><input id="filter" type="search" placeholder="filter rows">'
        f'<select id="status"><option value="">all statuses</option>{options}</select><span id="count"></span></div>\n'
        f'<table class="rows" id="rows"><thead><tr>{thead}</tr></thead><tbody>\n' + "\n".join(body)
        + f"\n</tbody></table>\n<script>{_JS}</script>\n</body></html>\n"
    )


class BatchReport:
    """The report of one output folder: ``report.html``, its ``report/`` thumbnails and ``report/rows.json``.

    Args:
        folder: the batch's output folder (the page is written beside the manifest).
        header: page header and columns.
        interval: rewrite the page at most every this many seconds (:meth:`write` with
            ``force=True`` always writes); 0 rewrites after every item.
        max_rows: rows shown with their thumbnails; beyond it only failed rows are shown (a
            note counts the rest), so a page of 100,000 tiles stays light.
        keep_previous: start from the rows an earlier run recorded in ``report/rows.json``.
    """

    def __init__(self, folder: str | Path, header: ReportHeader, interval: float = 0.0, max_rows: int = 5000,
                 keep_previous: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "report.html"
        self.assets = self.folder / "report"
        self.header, self.interval, self.max_rows = header, float(interval), int(max_rows)
        self.rows: dict[str, ReportRow] = self._previous() if keep_previous else {}
        self._last = float("-inf")

    def _previous(self) -> dict[str, ReportRow]:
        try:
            data = json.loads((self.assets / "rows.json").read_text(encoding="utf-8"))
            return {r["key"]: ReportRow.from_dict(r) for r in data}
        except (OSError, ValueError, KeyError, TypeError):  # missing or unreadable: start afresh
            return {}

    def asset_name(self, key: str, kind: str, suffix: str = ".jpg") -> str:
        """Stable relative path ``report/<stem>-<hash>-<kind>.jpg`` of a row's thumbnail."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(key).name)[:60] or "item"
        digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        return f"report/{stem}-{digest}-{kind}{suffix}"

    def thumbnail(self, key: str, kind: str, image: Any, size: int = 160) -> str:
        """Write a thumbnail of ``image`` for row ``key`` and return its relative path ("" if it fails)."""
        from genpath.io.thumbnails import save_thumbnail

        relative = self.asset_name(key, kind)
        try:
            save_thumbnail(image, self.folder / relative, size=size)
        except (OSError, ValueError) as error:
            logger.info("report: no %s thumbnail for %s: %s", kind, key, error)
            return ""
        return relative

    def link(self, path: str | Path | None) -> str:
        """``path`` relative to the report's folder ("" for None or "")."""
        if not path:
            return ""
        return os.path.relpath(Path(path).resolve(), self.folder.resolve())

    def update(self, row: ReportRow) -> None:
        """Add or replace a row (by its key)."""
        self.rows[row.key] = row

    def retain(self, keys: Iterable[str]) -> None:
        """Keep only the rows whose key is in ``keys``, in that order."""
        self.rows = {k: self.rows[k] for k in keys if k in self.rows}

    def shown_rows(self) -> tuple[list[ReportRow], int]:
        """Rows on the page (the first ``max_rows``, plus every failed row) and how many are left out."""
        rows = list(self.rows.values())
        shown = [r for i, r in enumerate(rows) if i < self.max_rows or r.failed]
        return shown, len(rows) - len(shown)

    def write(self, force: bool = True) -> Path:
        """Rewrite ``report.html`` and ``report/rows.json`` atomically (throttled unless ``force``)."""
        if not force and time.monotonic() - self._last < self.interval:
            return self.path
        shown, hidden = self.shown_rows()
        self.assets.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.assets / "rows.json", [asdict(r) for r in self.rows.values()], indent=0)
        atomic_write_text(self.path, render_report(self.header, shown, hidden))
        self._last = time.monotonic()
        return self.path
