"""The generic slide engine: any tile function, the per-slide fit hook, jobs, batch resume; no stain knowledge."""

import csv

import numpy as np
import pytest
import torch
import zarr

from genpath.io.slide import open_slide
from genpath.io.synthetic_slide import write_synthetic_slide
from genpath.wsi import (
    SlideBatchSettings,
    SlideOptions,
    expand_slides,
    process_slide,
    run_slide_batch,
    run_slide_job,
    tile_function_for_slide,
)


@pytest.fixture
def slide_path(tmp_path, patches):
    return write_synthetic_slide(tmp_path / "in.svs", 768, 512, patches, kind="svs", tile=256, mpp=0.5, seed=3)


class MeanScaler:
    """A toy slide fitter: divides every window by the slide's mean tissue intensity (a per-slide map)."""

    def __init__(self):
        self.fits = []

    def __call__(self, windows):  # without a fit: identity
        return windows

    def fit_slide(self, images, mask=None):
        self.fits.append((tuple(images.shape), mask is None))
        mean = images.float().mean()
        return lambda windows: (windows.float() / mean * 0.5).clamp(0, 1)


def test_slide_fitter_is_fitted_once_and_its_map_applied_to_every_tile(tmp_path, slide_path):
    scaler = MeanScaler()
    options = SlideOptions(tile_size=256, output_format="ome-zarr", min_tissue=0.0, qc=False, fit_windows=4)
    result = process_slide(slide_path, tmp_path / "o.ome.zarr", scaler, options)
    assert len(scaler.fits) == 1 and scaler.fits[0][1]  # windows, no mask
    assert scaler.fits[0][0][1:] == (3, 256, 256) and 1 <= scaler.fits[0][0][0] <= 4
    with open_slide(slide_path) as src:
        whole = torch.from_numpy(src.read_region((0, 0), 0, (768, 512))).permute(2, 0, 1).float()
    got = np.moveaxis(np.asarray(zarr.open_group(result.output, mode="r")["0"]), 0, -1).astype(float)
    # one map for the slide: the output is the input times one constant (up to rounding)
    ratio = got[..., 0][whole[0].numpy() > 40] / whole[0].numpy()[whole[0].numpy() > 40]
    assert np.ptp(ratio[got[..., 0][whole[0].numpy() > 40] < 250]) < 0.02


def test_thumbnail_fit_passes_the_mask_and_tile_mode_skips_the_fit(tmp_path, slide_path):
    scaler = MeanScaler()
    process_slide(slide_path, tmp_path / "t.tiff", scaler, SlideOptions(tile_size=256, fit_on="thumbnail", qc=False))
    assert len(scaler.fits) == 1 and not scaler.fits[0][1] and len(scaler.fits[0][0]) == 3
    scaler = MeanScaler()
    process_slide(slide_path, tmp_path / "p.tiff", scaler, SlideOptions(tile_size=256, source="tile", qc=False))
    assert scaler.fits == []


def test_tile_function_for_slide_falls_back_to_the_processor():
    plain = torch.nn.Identity()
    assert tile_function_for_slide(plain, torch.zeros(1, 3, 4, 4, dtype=torch.uint8), None) is plain

    class NoStats(MeanScaler):
        def fit_slide(self, images, mask=None):
            return None

    fitter = NoStats()
    assert tile_function_for_slide(fitter, torch.zeros(1, 3, 4, 4, dtype=torch.uint8), None) is fitter
    assert tile_function_for_slide(MeanScaler(), None, None).__class__ is MeanScaler


def test_jobs_refuse_two_inputs_writing_one_output(tmp_path, slide_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "x.svs", tmp_path / "b" / "x.svs"
    first.write_bytes(slide_path.read_bytes())
    second.write_bytes(slide_path.read_bytes())
    with pytest.raises(ValueError, match="distinct output names"):
        expand_slides([first, second], tmp_path / "out", "tiff")
    with pytest.raises(ValueError, match="distinct output names"):  # two folders holding the same name
        expand_slides([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "tiff")
    # one folder keeps relative names, so the same names in its sub-folders do not collide
    jobs = expand_slides([tmp_path], tmp_path / "out", "tiff")
    outputs = {j["output"] for j in jobs}
    assert outputs >= {str(tmp_path / "out" / "a" / "x.tiff"), str(tmp_path / "out" / "b" / "x.tiff")}
    # the same file twice is one job
    assert len(expand_slides([first, first], tmp_path / "out", "tiff")) == 1


@pytest.mark.parametrize(("mpp", "match"), [("nan", "mpp"), ("-1", "mpp"), ("abc", "mpp"), ("inf", "mpp")])
def test_csv_with_bad_mpp_is_named(tmp_path, slide_path, mpp, match):
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide,mpp\n{slide_path.name},{mpp}\n")
    with pytest.raises(ValueError, match=match):
        expand_slides([listing], tmp_path / "out", "tiff")


def test_batch_resumes_and_a_failing_processor_fails_only_its_row(tmp_path, slide_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    jobs = expand_slides([slide_path, broken], tmp_path / "out", "tiff")
    options = SlideOptions(tile_size=256, qc=False)
    calls = []

    def task(job, progress=None):
        calls.append(job["input"])
        return run_slide_job(job, lambda: torch.nn.Identity(), options, key="k1", progress=progress)

    fields = ("input", "output", "status", "error", "config_hash")
    rows = run_slide_batch(jobs, tmp_path / "out", task, SlideBatchSettings(key="k1", fields=fields))
    assert [r["status"] for r in rows] == ["done", "failed"] and "broken" in rows[1]["input"]
    with open(tmp_path / "out" / "manifest.csv", newline="") as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["done", "failed"]
    run_slide_batch(jobs, tmp_path / "out", task, SlideBatchSettings(key="k1", fields=fields))
    assert calls.count(str(slide_path)) == 1 and calls.count(str(broken)) == 2  # done is skipped, failed retried
    run_slide_batch(jobs, tmp_path / "out", task, SlideBatchSettings(key="k2", fields=fields))
    assert calls.count(str(slide_path)) == 2  # another config hash redoes it

    def build_fails():
        raise RuntimeError("weights missing")

    row = run_slide_job(jobs[0], build_fails, options, key="k")
    assert row["status"] == "failed" and "weights missing" in row["error"]


def test_one_slide_listed_twice_with_two_mpps_is_refused(tmp_path, slide_path):
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide,mpp\n{slide_path.name},0.5\n{slide_path.name},0.25\n")
    with pytest.raises(ValueError, match="one mpp per slide"):
        expand_slides([listing], tmp_path / "out", "tiff")
