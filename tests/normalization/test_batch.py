import csv
import os

import openslide
import pytest
import yaml
from typer.testing import CliRunner

from genpath.cli import app
from genpath.config import load_config
from genpath.io.slide import open_slide
from genpath.io.synthetic_slide import write_synthetic_slide
from normalization import batch
from normalization.batch import MANIFEST_FIELDS, config_hash, expand_slides, process_slide, run_batch
from normalization.config import NormalizeConfig
from tests.conftest import SAMPLES

TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")


@pytest.fixture
def slides(tmp_path, patches):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_synthetic_slide(folder / "a.svs", 768, 512, patches, kind="svs", tile=256, seed=1)
    write_synthetic_slide(folder / "b.tif", 512, 512, patches, kind="tiff", tile=256, seed=2, mpp=None)
    (folder / "corrupt.svs").write_bytes(b"\x00" * 1000)
    return folder


def manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(handle)}


def cli(*args):
    return CliRunner().invoke(app, ["normalize", "slides", *map(str, args)], catch_exceptions=False)


def test_cli_folder_of_slides_with_a_corrupt_file(tmp_path, slides):
    out = tmp_path / "out"
    result = cli(slides, "--target", TARGET, "--out", out, "--tile-size", 256)
    assert result.exit_code == 1  # one slide failed, the others were done
    rows = manifest(out)
    assert set(rows) == {"a.svs", "b.tif", "corrupt.svs"}
    assert rows["corrupt.svs"]["status"] == "failed" and "no backend reads" in rows["corrupt.svs"]["error"]
    assert rows["a.svs"]["status"] == rows["b.tif"]["status"] == "done"
    assert list(csv.DictReader(open(out / "manifest.csv")).fieldnames) == list(MANIFEST_FIELDS)
    assert rows["a.svs"]["width"] == "768" and float(rows["a.svs"]["mpp"]) == pytest.approx(0.5)
    assert rows["b.tif"]["mpp"] == ""  # no metadata, no override
    slide = openslide.OpenSlide(str(out / "a.tiff"))
    assert slide.dimensions == (768, 512) and float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert (out / "a.tiff.qc" / "before_after.png").is_file() and (out / "a.tiff.qc" / "tissue_mask.png").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["config_hash"] == rows["a.svs"]["config_hash"]
    reloaded = load_config(out / "config.yaml", NormalizeConfig, section="normalize")
    assert config_hash(reloaded) == saved["config_hash"]  # the resolved config reproduces the run


def test_resume_skips_done_slides_and_redoes_on_config_change(tmp_path, slides, monkeypatch):
    out = tmp_path / "out"
    (slides / "corrupt.svs").unlink()
    cli(slides, "--target", TARGET, "--out", out, "--tile-size", 256)
    first = manifest(out)
    calls = []
    real = batch.process_slide
    monkeypatch.setattr(batch, "process_slide", lambda *a, **k: calls.append(a[1]["input"]) or real(*a, **k))
    result = cli(slides, "--target", TARGET, "--out", out, "--tile-size", 256)
    assert result.exit_code == 0 and calls == [] and "resumed) 2" in result.output.replace("\n", " ")
    assert manifest(out) == first
    (out / "b.tiff").unlink()  # a missing output is redone
    cli(slides, "--target", TARGET, "--out", out, "--tile-size", 256)
    assert [os.path.basename(c) for c in calls] == ["b.tif"]
    calls.clear()
    refused = cli(slides, "--target", TARGET, "--out", out, "--tile-size", 128)  # other settings: refused
    assert refused.exit_code == 2 and "or --overwrite" in refused.output and calls == []
    cli(slides, "--target", TARGET, "--out", out, "--tile-size", 128, "--overwrite")  # new config: everything again
    assert len(calls) == 2 and manifest(out)["a.svs"]["config_hash"] != first["a.svs"]["config_hash"]
    calls.clear()
    cli(slides, "--target", TARGET, "--out", out, "--tile-size", 128, "--overwrite")
    assert len(calls) == 2


def test_interrupted_tiff_is_never_mistaken_for_done(tmp_path, slides):
    out = tmp_path / "out"
    out.mkdir()
    (slides / "corrupt.svs").unlink()
    (out / ".a.tiff.partial").write_bytes(b"half a slide")  # what a kill -9 leaves behind
    cfg = NormalizeConfig(target=[TARGET], output_format="tiff", slide={"tile_size": 256})
    rows = run_batch([slides], out, cfg)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert not (out / ".a.tiff.partial").exists()
    assert openslide.OpenSlide(str(out / "a.tiff")).level_count >= 2


def test_csv_input_supplies_mpp(tmp_path, slides):
    table = tmp_path / "slides.csv"
    table.write_text("slide,mpp\nslides/b.tif,0.25\n")
    out = tmp_path / "out"
    result = cli(table, "--target", TARGET, "--out", out, "--tile-size", 256, "--format", "ome-zarr")
    assert result.exit_code == 0, result.output
    row = manifest(out)["b.tif"]
    assert float(row["mpp"]) == pytest.approx(0.25)
    with open_slide(out / "b.ome.zarr") as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25))


def test_process_slide_is_idempotent_and_never_raises(tmp_path, slides):
    cfg = NormalizeConfig(target=[TARGET], output_format="tiff", slide={"tile_size": 256, "qc": False})
    jobs = expand_slides([slides], tmp_path / "o", "tiff")
    job = next(j for j in jobs if j["input"].endswith("a.svs"))
    first, second = process_slide(cfg, job), process_slide(cfg, job)
    assert first["status"] == second["status"] == "done"
    bad = next(j for j in jobs if j["input"].endswith("corrupt.svs"))
    assert process_slide(cfg, bad)["status"] == "failed"


def test_fail_fast_stops_the_batch(tmp_path, slides):
    result = cli(slides, "--target", TARGET, "--out", tmp_path / "o", "--fail-fast")
    assert result.exit_code == 1 and "stopped" in result.output


def test_bad_arguments_are_named(tmp_path, slides):
    result = CliRunner().invoke(app, ["normalize", "slides", str(slides), "--target", TARGET,
                                      "--out", str(tmp_path / "o"), "--overlap", "9999"])
    assert result.exit_code != 0 and "overlap" in result.output
    result = CliRunner().invoke(app, ["normalize", "slides", str(tmp_path / "nothing*.svs"), "--target", TARGET,
                                      "--out", str(tmp_path / "o"), "--format", "tiff"])
    assert result.exit_code != 0 and "no match" in result.output


def test_dask_executor_with_local_cluster(tmp_path, slides):
    pytest.importorskip("distributed")
    (slides / "corrupt.svs").unlink()
    out = tmp_path / "dask"
    cfg = NormalizeConfig(target=[TARGET], output_format="tiff", executor="dask", workers=2,
                          slide={"tile_size": 256, "qc": False})
    rows = run_batch([slides], out, cfg)
    assert [r["status"] for r in rows] == ["done", "done"]
    local = run_batch([slides], tmp_path / "local", NormalizeConfig(target=[TARGET], output_format="tiff",
                                                                    slide={"tile_size": 256, "qc": False}))
    for r_dask, r_local in zip(rows, local, strict=True):
        with open_slide(r_dask["output"]) as a, open_slide(r_local["output"]) as b:
            assert (a.read_region((0, 0), 0, a.dimensions) == b.read_region((0, 0), 0, b.dimensions)).all()


def test_shipped_slide_config_loads_and_runs(tmp_path, slides):
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "normalize_slides.yaml", NormalizeConfig, section="normalize")
    assert cfg.slide_mode and cfg.slide_options().tile_size == 512
    (slides / "corrupt.svs").unlink()
    result = cli(slides, "--config", ROOT / "configs" / "normalize_slides.yaml", "--out", tmp_path / "o",
                 "--target", TARGET)
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="slide: unknown keys"):
        NormalizeConfig(output_format="tiff", slide={"tile": 3})


def test_kill_9_mid_slide_then_rerun(tmp_path, patches):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    folder = tmp_path / "big"
    folder.mkdir()
    write_synthetic_slide(folder / "big.svs", 4096, 4096, patches, kind="svs", tile=256, tissue_share=0.6)
    out = tmp_path / "out"
    exe = str(Path(sys.executable).parent / "genpath")
    args = [exe, "normalize", "slides", str(folder), "--target", TARGET, "--out", str(out), "--tile-size", "256"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".big.tiff.partial"
    deadline = time.time() + 60
    while not (partial.exists() and partial.stat().st_size > 100_000) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "big.tiff").exists()  # a partial file is never mistaken for a finished one
    rerun = subprocess.run(args, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert manifest(out)["big.svs"]["status"] == "done" and not partial.exists()
    assert openslide.OpenSlide(str(out / "big.tiff")).dimensions == (4096, 4096)
    assert killed, "the run finished before it could be killed; the interruption was not exercised"


def test_local_process_workers(tmp_path, slides):
    (slides / "corrupt.svs").unlink()
    cfg = NormalizeConfig(target=[TARGET], output_format="ome-zarr", workers=2, slide={"tile_size": 256, "qc": False})
    rows = run_batch([slides], tmp_path / "o", cfg)
    assert [r["status"] for r in rows] == ["done", "done"]
