"""report.html as a user sees it: every row present, failed rows marked, every link resolving, offline, not blank."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from genpath.apps.translate import TranslateOptions, translate_slides, translate_tiles
from genpath.cli import app
from genpath.io.synthetic_slide import write_synthetic_slide
from genpath.report import BatchReport, ReportHeader, ReportRow, Swatch, render_report
from normalization import MacenkoNormalizer, ReinhardNormalizer
from normalization.report import RecordingSlideFitter, stain_state, state_swatches
from normalization.tiles import normalize_tiles
from tests.conftest import SAMPLES

TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")


class Page(HTMLParser):
    """The parts of report.html a test looks at: rows (with their cells' text), links, scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.scripts: list[dict] = []
        self.header_images: list[str] = []
        self._in_body = False
        self._row: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tbody":
            self._in_body = True
        if tag == "tr" and self._in_body:
            self._row = {"class": attrs.get("class", ""), "status": attrs.get("data-status"),
                         "key": attrs.get("data-key"), "text": "", "images": [], "swatches": 0, "links": []}
            self.rows.append(self._row)
        for name in ("src", "href"):
            if name in attrs:
                self.links.append(attrs[name])
                if self._row is not None:
                    self._row["images" if name == "src" else "links"].append(attrs[name])
                elif tag == "img":
                    self.header_images.append(attrs[name])
        if tag in ("script", "link"):
            self.scripts.append(attrs)
        if self._row is not None and tag == "span" and "style" in attrs:
            self._row["swatches"] += 1

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def check_offline(page: Page, folder: Path) -> None:
    """Every src/href is a relative link to an existing file; no external script or stylesheet."""
    assert page.links
    for link in page.links:
        assert "://" not in link and not link.startswith("//"), f"external resource {link}"
        assert (folder / unquote(link)).exists(), f"broken link {link}"
    assert all(not s.get("src") and not s.get("href") for s in page.scripts)


# --- the page itself -------------------------------------------------------------------------------------------


def test_render_escapes_text_and_marks_failed_rows():
    header = ReportHeader(title="<b>t</b>", fields={"method": "x"})
    rows = [ReportRow(key="a", name="a<script>.png", status="failed", error='bad "<img src=x>"'),
            ReportRow(key="b", name="b.png", status="done", values={"tissue": 12.5, "tiles": 3, "seconds": 1.25}),
            ReportRow(key="c", name="c.png", status="done", values={"seconds": float("nan")})]
    html = render_report(header, rows)
    assert "<script>.png" not in html and "a&lt;script&gt;.png" in html and "<img src=x>" not in html
    page = Page()
    page.feed(html)
    assert [r["key"] for r in page.rows] == ["a", "b", "c"]
    assert page.rows[0]["class"] == "failed" and page.rows[1]["class"] == "done"
    assert "12.5" in page.rows[1]["text"] and "seconds (sum)" in html and "1.2" in html  # NaN left out of the sum
    assert "http" not in html.lower().replace("http-equiv", "")  # no CDN


def test_swatch_colours_are_exp_minus_od():
    assert Swatch("w", (300, -5, float("nan"))).rgb == (255, 0, 0)
    state = {"stains": [[0.0, 0.0, 0.0], [np.log(2), np.log(4), 0.0]], "max_concentrations": [2.0, 1.0],
             "percentile": 99.0}
    swatches = state_swatches(state)
    assert [s.label for s in swatches] == ["H", "H p99", "E", "E p99"]
    assert swatches[0].rgb == (255, 255, 255)  # OD 0: white
    assert swatches[2].rgb == (128, 64, 255)  # exp(-ln 2) = 1/2, exp(-ln 4) = 1/4
    assert swatches[3].rgb == (128, 64, 255)  # concentration 1: the vector itself
    lab = state_swatches({"lab_mean": [100.0, 0.0, 0.0], "lab_std": [1.0, 1.0, 1.0]})
    assert lab[0].label == "LAB" and min(lab[0].rgb) >= 250  # L=100: white


def test_fitted_state_and_slide_recording(real_tiles):
    macenko = MacenkoNormalizer().fit(real_tiles[:2])
    state = stain_state(macenko)
    assert len(state["stains"]) == 2 and state["max_concentrations"] == pytest.approx(
        macenko.target_max_concentrations.tolist(), abs=1e-3)
    assert "lab_mean" in stain_state(ReinhardNormalizer().fit(real_tiles[:2]))
    fitter = RecordingSlideFitter(macenko)
    fn = fitter.fit_slide(real_tiles[2:])
    assert fitter.state is not None and torch.equal(fn(real_tiles[:1]), macenko(real_tiles[:1], source=(
        macenko.estimate_source(real_tiles[2:]))))
    assert fitter.fit_slide(torch.full((2, 3, 64, 64), 255, dtype=torch.uint8)) is None  # background: no state


def test_batch_report_keeps_rows_and_caps_the_page(tmp_path):
    header = ReportHeader(title="t")
    report = BatchReport(tmp_path, header, max_rows=2)
    for i in range(4):
        report.update(ReportRow(key=str(i), name=f"{i}.png", status="failed" if i == 3 else "done"))
    report.write()
    page = parse(tmp_path / "report.html")
    assert [r["key"] for r in page.rows] == ["0", "1", "3"]  # failed rows always shown
    assert "1 rows not shown" in (tmp_path / "report.html").read_text()
    again = BatchReport(tmp_path, header)  # a rerun starts from the rows recorded in report/rows.json
    assert list(again.rows) == ["0", "1", "2", "3"]


# --- genpath normalize slides / tiles ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slides")
    inputs = folder / "in"
    inputs.mkdir()
    shutil.copy(SAMPLES / "slides" / "he_cmu_small_region.svs", inputs)
    data = (SAMPLES / "slides" / "he_cmu_small_region.svs").read_bytes()
    (inputs / "truncated.svs").write_bytes(data[:4096])  # a corrupt copy
    (inputs / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    out = folder / "out"
    result = CliRunner().invoke(app, ["normalize", "slides", str(inputs), "--target", TARGET, "--method", "macenko",
                                      "--out", str(out)])
    return inputs, out, result


def test_slide_report_rows_failed_rows_and_links(slide_run):
    inputs, out, result = slide_run
    assert result.exit_code == 1, result.output  # two slides failed, one was done
    page = parse(out / "report.html")
    assert sorted(Path(r["key"]).name for r in page.rows) == ["broken.tif", "he_cmu_small_region.svs",
                                                              "truncated.svs"]
    failed = {Path(r["key"]).name: r for r in page.rows if r["class"] == "failed"}
    assert set(failed) == {"broken.tif", "truncated.svs"} and all("no backend reads" in r["text"]
                                                                  for r in failed.values())
    done = next(r for r in page.rows if r["status"] == "done")
    assert len(done["images"]) == 3 and done["swatches"] == 4  # before, after, tissue; H, H p99, E, E p99
    assert done["links"] == ["he_cmu_small_region.tiff"]
    assert len(page.header_images) == 1 and "target" in page.header_images[0]
    html = (out / "report.html").read_text()
    assert "macenko" in html and "config hash" in html and "target H" in html
    check_offline(page, out)
    qc = json.loads((out / "he_cmu_small_region.tiff.qc" / "report.json").read_text())
    assert [s["label"] for s in qc["swatches"]] == ["H", "H p99", "E", "E p99"]
    for name in ("before", "after", "mask"):
        thumb = next(p for p in (out / "report").glob(f"*-{name}.jpg"))
        assert max(Image.open(thumb).size) <= 160 and thumb.stat().st_size < 40_000


def test_slide_report_survives_a_resumed_rerun(slide_run):
    inputs, out, _ = slide_run
    before = {Path(r["key"]).name: r["images"] for r in parse(out / "report.html").rows}
    result = CliRunner().invoke(app, ["normalize", "slides", str(inputs), "--target", TARGET, "--method", "macenko",
                                      "--out", str(out)])
    assert result.exit_code == 1 and "resumed) 1" in result.output.replace("\n", " ")
    page = parse(out / "report.html")
    assert {Path(r["key"]).name: r["images"] for r in page.rows} == before
    check_offline(page, out)


def test_tile_report_with_a_corrupt_tile(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(SAMPLES / "tiles" / "pcam", src)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["normalize", "tiles", str(src), "--target", TARGET, "--out", str(out)])
    assert result.exit_code == 1
    manifest = json.loads((out / "manifest.json").read_text())
    page = parse(out / "report.html")
    assert {r["key"] for r in page.rows} == {r["input"] for r in manifest}
    bad = [r for r in page.rows if r["class"] == "failed"]
    assert [Path(r["key"]).name for r in bad] == ["corrupt.png"] and "image" in bad[0]["text"]
    good = [r for r in page.rows if r["status"] == "normalized"]
    assert good and all(len(r["images"]) == 3 and r["swatches"] == 4 for r in good)
    check_offline(page, out)


def test_tile_report_from_python_shows_the_target_and_keeps_earlier_rows(tmp_path, real_tiles):
    from genpath.io.images import write_image

    src = tmp_path / "in"
    for i, tile in enumerate(real_tiles[:3]):
        write_image(tile, src / f"t{i}.png")
    norm = ReinhardNormalizer().fit(real_tiles[3:])
    out = tmp_path / "out"
    normalize_tiles([src / "t0.png", src / "t1.png"], out, norm, target=[TARGET])
    normalize_tiles([src / "t2.png"], out, norm, target=[TARGET])  # the earlier rows stay, as in the manifest
    page = parse(out / "report.html")
    assert [Path(r["key"]).name for r in page.rows] == ["t0.png", "t1.png", "t2.png"]
    assert all(r["swatches"] == 1 for r in page.rows)  # Reinhard: one LAB swatch per tile
    assert any("target" in src for src in page.header_images)
    check_offline(page, out)
    assert not (tmp_path / "plain").exists()
    normalize_tiles([src / "t0.png"], tmp_path / "plain", norm, report=False)
    assert not (tmp_path / "plain" / "report.html").exists()


# --- genpath translate -------------------------------------------------------------------------------------------


def test_translate_tiles_and_slides_write_reports(tmp_path, real_tiles, patches):
    from genpath.io.images import write_image

    def invert(image):
        return 255 - image

    src = tmp_path / "tiles"
    write_image(real_tiles[0], src / "a.png")
    (src / "b.png").write_bytes(b"not an image")
    rows = translate_tiles([str(src)], tmp_path / "t", invert)
    page = parse(tmp_path / "t" / "report.html")
    assert len(page.rows) == len(rows) == 2
    assert [r["class"] for r in page.rows] == ["translated", "failed"]
    assert len(page.rows[0]["images"]) == 2
    check_offline(page, tmp_path / "t")

    slides = tmp_path / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "s.svs", 512, 256, patches, kind="svs", tile=256, seed=3)
    (slides / "bad.svs").write_bytes(b"\x00" * 100)
    rows = translate_slides([str(slides)], tmp_path / "ts", invert, TranslateOptions(tile_size=256, overlap=0))
    page = parse(tmp_path / "ts" / "report.html")
    assert sorted(r["class"] for r in page.rows) == ["done", "failed"] and len(rows) == 2
    check_offline(page, tmp_path / "ts")


# --- in a browser ------------------------------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(slide_run, tmp_path):
    _, out, _ = slide_run
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,900", (out / "report.html").resolve().as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 20  # not a blank page: text, thumbnails, red rows
    red = (pixels[..., 0] > 240) & (pixels[..., 1] < 235) & (pixels[..., 1] > 200)  # the failed rows' background
    assert red.mean() > 0.01
