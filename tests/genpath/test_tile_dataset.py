"""Tile datasets from slides (genpath tiles): known tile counts, coords, pixels, resume, failures, dask, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from typer.testing import CliRunner

import genpath.wsi.tile_dataset as td
from genpath.cli import app
from genpath.io.slide import open_slide
from genpath.io.synthetic_slide import write_synthetic_slide
from genpath.tissue import detect_tissue
from genpath.wsi.engine import tissue_downsample
from genpath.wsi.options import SlideOptions
from genpath.wsi.tile_dataset import TileDatasetConfig, run_tile_dataset, subset_indices

runner = CliRunner()


@pytest.fixture(scope="module")
def slides(tmp_path_factory, patches):
    """Two small synthetic SVS slides at 0.5 µm/px (levels 1, 2, 4) and a folder holding both."""
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "a.svs", 768, 512, patches, kind="svs", tile=256, mpp=0.5, seed=3)
    write_synthetic_slide(folder / "b.svs", 512, 512, patches, kind="svs", tile=256, mpp=0.5, seed=5,
                          tissue_share=0.6)
    return folder


def arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in ("images", "coords", "slide_index")}, dict(group.attrs)


def expected_coords(slide, span, min_tissue):
    """Tissue tiles computed here: the engine's mask, each cell's share counted with plain slicing."""
    with open_slide(slide) as reader:
        mask = detect_tissue(reader.thumbnail(tissue_downsample(reader, SlideOptions())))
        ds = reader.dimensions[0] / mask.shape[1]
        w, h = reader.dimensions
    kept = []
    for row in range(h // span):
        for col in range(w // span):
            x, y = col * span, row * span
            cell = mask[int(y / ds) : math.ceil((y + span) / ds), int(x / ds) : math.ceil((x + span) / ds)]
            if cell.mean() >= min_tissue:
                kept.append((x, y))
    return np.array(kept, np.int64).reshape(-1, 2)


def test_tiles_match_an_independent_tissue_count_and_the_slide_level(tmp_path, slides):
    rows = run_tile_dataset(TileDatasetConfig([str(slides / "a.svs")], str(tmp_path / "d.zarr"), mpp=1.0,
                                              tile_size=64, min_tissue=0.5))
    got, attrs = arrays(tmp_path / "d.zarr")
    want = expected_coords(slides / "a.svs", 128, 0.5)  # 64 px at 1.0 µm/px = 128 level-0 px
    assert 0 < len(want) < 24 and np.array_equal(got["coords"], want)
    assert (got["coords"] % 128 == 0).all() and got["images"].shape == (len(want), 3, 64, 64)
    assert got["images"].dtype == np.uint8 and (got["slide_index"] == 0).all()
    with open_slide(slides / "a.svs") as reader:  # level 1 is exactly 1.0 µm/px: tiles are its pixels
        for i in (0, len(want) - 1):
            region = reader.read_region(tuple(int(v) for v in want[i]), 1, (64, 64))
            assert np.array_equal(got["images"][i], region.transpose(2, 0, 1))
    assert rows[0]["status"] == "done" and rows[0]["n_tiles"] == len(want) and rows[0]["mpp"] == 0.5
    assert (rows[0]["width"], rows[0]["height"]) == (768, 512)
    assert {k: attrs[k] for k in td.SETTINGS_KEYS} == {"mpp": 1.0, "tile_size": 64, "min_tissue": 0.5,
                                                      "max_tiles_per_slide": None, "seed": 0}
    assert attrs["n_tiles"] == len(want) and attrs["layout"] == "NCHW" and attrs["version"]


def test_min_tissue_zero_keeps_the_whole_grid_and_other_mpps_are_resized(tmp_path, slides):
    run_tile_dataset(TileDatasetConfig([str(slides / "a.svs")], str(tmp_path / "d.zarr"), mpp=0.75, tile_size=32,
                                       min_tissue=0.0))
    got, _ = arrays(tmp_path / "d.zarr")
    assert len(got["coords"]) == (768 // 48) * (512 // 48)  # 32 px at 0.75 µm/px = 48 level-0 px
    with open_slide(slides / "a.svs") as reader:  # no level at 0.75: read 48² at level 0, resize to 32²
        x, y = (int(v) for v in got["coords"][17])
        region = torch.from_numpy(reader.read_region((x, y), 0, (48, 48))).permute(2, 0, 1)[None].float()
    reference = F.interpolate(region, size=(32, 32), mode="area")[0]
    assert (reference - torch.from_numpy(got["images"][17]).float()).abs().mean() < 4


def test_max_tiles_is_a_seeded_subset_in_raster_order(tmp_path, slides):
    def coords(seed, name):
        run_tile_dataset(TileDatasetConfig([str(slides / "a.svs")], str(tmp_path / name), mpp=1.0, tile_size=32,
                                           min_tissue=0.0, max_tiles_per_slide=5, seed=seed))
        return arrays(tmp_path / name)[0]["coords"]

    first, again, other = coords(0, "a.zarr"), coords(0, "b.zarr"), coords(1, "c.zarr")
    assert len(first) == 5 and np.array_equal(first, again) and not np.array_equal(first, other)
    order = first[:, 1] * 10_000 + first[:, 0]
    assert (np.diff(order) > 0).all() and (first % 64 == 0).all()
    assert subset_indices(3, 5, 0, "x").tolist() == [0, 1, 2]


def test_interrupted_run_resumes_to_the_same_arrays(tmp_path, slides, monkeypatch):
    cfg = dict(inputs=[str(slides)], mpp=1.0, tile_size=32, min_tissue=0.3)
    run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "ref.zarr"), **cfg))
    reference, ref_attrs = arrays(tmp_path / "ref.zarr")
    original, calls = td.read_tiles, {"n": 0}

    def interrupted(reader, plan, tile_size, start, stop):
        if reader.path.name == "b.svs":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # killed midway through b: a's rows are committed, b's half written
        return original(reader, plan, tile_size, start, stop)

    monkeypatch.setattr(td, "READ_BATCH", 4)
    monkeypatch.setattr(td, "read_tiles", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "d.zarr"), **cfg))
    attrs = dict(zarr.open_group(str(tmp_path / "d.zarr"), mode="r").attrs)
    assert [s["status"] for s in attrs["slides"]] == ["done", "pending"]
    assert zarr.open_group(str(tmp_path / "d.zarr"))["images"].shape[0] > attrs["n_tiles"]  # uncommitted rows
    monkeypatch.setattr(td, "read_tiles", original)
    seen = []
    run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "d.zarr"), **cfg), on_slide=seen.append)
    got, got_attrs = arrays(tmp_path / "d.zarr")
    assert [r.get("resumed", False) for r in seen] == [True, False]
    assert all(np.array_equal(got[k], reference[k]) for k in reference)
    assert got_attrs["slides"] == ref_attrs["slides"]


def test_a_failed_slide_is_recorded_and_the_others_written(tmp_path, slides):
    (tmp_path / "in").mkdir()
    for name in ("a.svs", "b.svs"):
        (tmp_path / "in" / name).write_bytes((slides / name).read_bytes())
    (tmp_path / "in" / "broken.svs").write_bytes(b"II*\x00 not a slide")
    result = runner.invoke(app, ["tiles", str(tmp_path / "in"), "--out", str(tmp_path / "d.zarr"), "--mpp", "1.0",
                                 "--tile-size", "32", "--min-tissue", "0.3"])
    assert result.exit_code == 1, result.output
    assert "failed broken.svs" in result.output.replace(str(tmp_path / "in") + "/", "")
    got, attrs = arrays(tmp_path / "d.zarr")
    status = {s["path"].rsplit("/", 1)[1]: s for s in attrs["slides"]}
    assert status["broken.svs"]["status"] == "failed" and "\n" not in status["broken.svs"]["error"]
    assert status["broken.svs"]["error"].startswith("ValueError: path: expected a readable slide")
    assert status["a.svs"]["status"] == status["b.svs"]["status"] == "done"
    assert attrs["n_tiles"] == len(got["images"]) == status["a.svs"]["n_tiles"] + status["b.svs"]["n_tiles"]
    index = [s["path"] for s in attrs["slides"]].index(status["b.svs"]["path"])
    assert np.array_equal(np.unique(got["slide_index"]), sorted([0, index]))


def test_slides_without_mpp_need_the_fallback(tmp_path, patches):
    slide = write_synthetic_slide(tmp_path / "flat.tiff", 256, 256, patches, kind="flat", mpp=None, seed=1)
    rows = run_tile_dataset(TileDatasetConfig([str(slide)], str(tmp_path / "d.zarr"), mpp=1.0, tile_size=32,
                                              min_tissue=0.0))
    assert rows[0]["status"] == "failed" and "mpp: expected microns-per-pixel metadata" in rows[0]["error"]
    rows = run_tile_dataset(TileDatasetConfig([str(slide)], str(tmp_path / "d.zarr"), mpp=1.0, tile_size=32,
                                              min_tissue=0.0, slide_mpp=0.5))
    assert rows[0]["status"] == "done" and rows[0]["n_tiles"] == 16 and rows[0]["mpp"] == 0.5


def test_dask_executor_gives_the_same_arrays_as_local(tmp_path, slides):
    from distributed import LocalCluster

    cfg = dict(inputs=[str(slides / "b.svs"), str(slides / "a.svs")], mpp=1.0, tile_size=32, min_tissue=0.3)
    run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "local.zarr"), **cfg))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "dask.zarr"), executor="dask", workers=2,
                                           scheduler=cluster.scheduler_address, **cfg))
    local, local_attrs = arrays(tmp_path / "local.zarr")
    dask, dask_attrs = arrays(tmp_path / "dask.zarr")
    assert all(np.array_equal(local[k], dask[k]) for k in local) and local_attrs["slides"] == dask_attrs["slides"]
    assert not (tmp_path / "dask.zarr" / "_parts").exists()


def test_a_finished_part_of_an_interrupted_parallel_run_is_appended(tmp_path, slides, monkeypatch):
    cfg = dict(inputs=[str(slides / "a.svs")], mpp=1.0, tile_size=32, min_tissue=0.3)
    run_tile_dataset(TileDatasetConfig(out=str(tmp_path / "ref.zarr"), **cfg))
    out = tmp_path / "d.zarr"
    td._prepare(TileDatasetConfig(out=str(out), **cfg), [])
    job = {"input": str(slides / "a.svs"), "path": str((slides / "a.svs").resolve()), "index": 0,
           "part": str(out / "_parts" / "0")}
    assert td.write_slide_part(job, TileDatasetConfig(out=str(out), **cfg).settings())["status"] == "done"

    def never(*args, **kwargs):
        raise AssertionError("the finished part should have been reused")

    monkeypatch.setattr(td, "write_slide_part", never)
    run_tile_dataset(TileDatasetConfig(out=str(out), workers=2, **cfg))
    assert all(np.array_equal(a, b) for a, b in zip(arrays(out)[0].values(), arrays(tmp_path / "ref.zarr")[0].values(),
                                                     strict=True))


def test_other_settings_are_refused_unless_overwrite(tmp_path, slides):
    args = ["tiles", str(slides / "a.svs"), "--out", str(tmp_path / "d.zarr"), "--mpp", "1.0", "--tile-size", "32"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, [*args[:-1], "64"])
    assert result.exit_code == 2 and result.output.startswith("error: tile-size: expected 32 as in the dataset")
    assert runner.invoke(app, [*args[:-1], "64", "--overwrite"]).exit_code == 0
    assert arrays(tmp_path / "d.zarr")[0]["images"].shape[-1] == 64


@pytest.mark.parametrize(("extra", "message"), [
    (["--mpp", "-1"], "error: mpp: expected a finite positive number"),
    (["--mpp", "nan"], "error: mpp: expected a finite positive number"),
    (["--tile-size", "0"], "error: tile-size: expected 16..8192 pixels, got 0"),
    (["--min-tissue", "nan"], "error: min-tissue: expected a share in [0, 1], got nan"),
    (["--min-tissue", "1.5"], "error: min-tissue: expected a share in [0, 1]"),
    (["--max-tiles-per-slide", "0"], "error: max-tiles-per-slide: expected a positive integer"),
    (["--slide-mpp", "inf"], "error: slide-mpp: expected a finite positive number"),
    (["--executor", "spark"], "error: executor: expected 'local' or 'dask'"),
    (["--workers", "0"], "error: workers: expected a positive integer"),
])
def test_hostile_tiles_options_are_one_line(tmp_path, slides, extra, message):
    result = runner.invoke(app, ["tiles", str(slides / "a.svs"), "--out", str(tmp_path / "d.zarr"), *extra])
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "d.zarr").exists()


def test_hostile_paths_are_one_line_and_leave_files_alone(tmp_path, slides):
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    a, out = str(slides / "a.svs"), str(tmp_path / "d.zarr")
    cases = [
        (["tiles", str(tmp_path / "missing.svs"), "--out", out], "error: inputs: expected a slide"),
        (["tiles", a, "--out", str(afile)], "error: out: expected a dataset folder (.zarr), got the existing file"),
        (["tiles", a, "--out", str(tmp_path / "other")], "error: out: expected a new folder or a dataset made by "
                                                         "'genpath tiles'"),
        (["tiles", str(slides), "--out", a], "error: out: expected a dataset folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.startswith(message), (args, result.output)
        assert result.output.count("\n") == 1
    assert afile.read_bytes() == b"mine" and (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in slides.iterdir()) == ["a.svs", "b.svs"]
