"""No data loss, by construction: reruns with other settings, --overwrite, manifest merges, stale
temporaries, same-name inputs and synth-large outputs (issue 21, item 2)."""

import glob
import json
import os
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genpath.apps.synth_large import MARKER, synth_large_image
from genpath.apps.translate import translate_tiles
from genpath.cli import app
from genpath.io.images import read_image, write_image
from genpath.synth import SynthConfig, read_manifest, run_synth
from genpath.synth_masks import MaskSynthConfig, run_mask_synth
from normalization.tiles import normalize_tiles
from tests.conftest import SAMPLES
from tests.genpath.test_mask_pipeline import ldm_dir, mask_pipe, masks  # noqa: F401 - fixtures
from tests.genpath.test_pipeline import pipe  # noqa: F401 - fixture

runner = CliRunner()


def snapshot(folder):
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory, pipe):  # noqa: F811
    folder = tmp_path_factory.mktemp("synth") / "pipe"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def emb(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.random.default_rng(0).normal(size=(2, 12)).astype(np.float32))
    return path


def synth_cfg(model, out, emb, **kw):
    return SynthConfig(**{"model": str(model), "out": str(out), "embeddings": str(emb), "n_per_condition": 2,
                          "steps": 1, "output_format": "png", **kw})


# --- synth: settings recorded, reruns with other settings refused, --overwrite, resume -------------------------


def test_synth_records_its_settings_and_refuses_a_rerun_with_other_settings(tmp_path, model, emb):
    out = tmp_path / "o"
    run_synth(synth_cfg(model, out, emb))
    record = json.loads((out / "run.json").read_text())
    assert record["created_by"] == "genpath synth"
    settings = record["settings"]
    assert settings["n_per_condition"] == 2 and settings["steps"] == 1 and settings["output_format"] == "png"
    assert settings["model"] == str(model.resolve()) and len(settings["model_config"]) == 64
    before = snapshot(out)
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(1).normal(size=(2, 12)).astype(np.float32))
    changes = {"n_per_condition": {"n_per_condition": 3}, "seed": {"seed": 1}, "steps": {"steps": 2},
               "guidance": {"guidance": 3.0}, "conditions": {"embeddings": str(other)},
               "output_format": {"output_format": "zarr"}}
    for key, change in changes.items():
        with pytest.raises(ValueError, match=rf"^out: expected the settings of the run already in .* \(or "
                                             rf"--overwrite\), got different {key}$"):
            run_synth(synth_cfg(model, out, emb, **change))
        assert snapshot(out) == before, key  # byte-identical: nothing written, nothing removed
    # a changed model config (retrained with other settings) is another run too
    config = model / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    config.write_text(json.dumps({**json.loads(text), "steps_offset": 1}))
    try:
        with pytest.raises(ValueError, match="got different model_config$"):
            run_synth(synth_cfg(model, out, emb))
    finally:
        config.write_text(text)
    assert snapshot(out) == before


def test_synth_cli_refuses_with_one_line_and_overwrite_starts_over(tmp_path, model, emb):
    out = tmp_path / "o"
    args = ["synth", "--model", str(model), "--embeddings", str(emb), "--steps", "1", "--format", "png", "--out",
            str(out)]
    assert runner.invoke(app, [*args, "--n-per-condition", "2"], catch_exceptions=False).exit_code == 0
    (out / "notes.txt").write_text("mine")  # the user's files: never touched
    (out / "images" / "mine.png").write_bytes(b"not ours")
    before = snapshot(out)
    result = runner.invoke(app, [*args, "--n-per-condition", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "--overwrite" in errors[0] and "n_per_condition" in errors[0] and "Traceback" not in result.output
    assert snapshot(out) == before
    result = runner.invoke(app, [*args, "--n-per-condition", "1", "--overwrite"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == ["cond00000_000.png", "cond00001_000.png", "mine.png"]  # the old _001 samples are gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "images" / "mine.png").read_bytes() == b"not ours"
    assert [r["id"] for r in read_manifest(out / "manifest.csv")] == ["0", "1"]
    assert json.loads((out / "run.json").read_text())["settings"]["n_per_condition"] == 1


def test_synth_overwrite_from_png_to_zarr_leaves_no_old_samples(tmp_path, model, emb):
    out = tmp_path / "o"
    run_synth(synth_cfg(model, out, emb))
    rows = run_synth(synth_cfg(model, out, emb, output_format="zarr", overwrite=True))
    assert not (out / "images").exists() and (out / "images.zarr").is_dir()
    assert all(r["file"].startswith("images.zarr/") for r in rows) and len(rows) == 4


def test_synth_same_settings_resume_pixel_identical(tmp_path, model, emb):
    out = tmp_path / "o"
    first = run_synth(synth_cfg(model, out, emb, batch_size=1))
    before = snapshot(out)
    # interrupted after the first sample: its manifest row and image are all that is left of the rest
    kept = read_manifest(out / "manifest.csv")[:1]
    from genpath.synth import MANIFEST_FIELDS
    from genpath.utils.atomic import atomic_write_csv

    atomic_write_csv(out / "manifest.csv", kept, MANIFEST_FIELDS)
    for row in first[1:]:
        (out / row["file"]).unlink()
    (out / "images" / ".cond00000_001.png.k2j3h4g5.png").write_bytes(b"")  # a kill -9 leftover
    again = run_synth(synth_cfg(model, out, emb, batch_size=1))
    assert [int(r["id"]) for r in again] == [0, 1, 2, 3]
    assert snapshot(out) == before  # same seeds, same batches: byte-identical, leftover removed


def test_synth_refuses_outputs_without_a_record_and_inputs_among_its_outputs(tmp_path, model, emb):
    out = tmp_path / "legacy"
    out.mkdir()
    (out / "manifest.csv").write_text("id,file\n0,x.png\n")  # an older genpath's run, or another program's
    before = snapshot(out)
    with pytest.raises(ValueError, match="outputs without run.json"):
        run_synth(synth_cfg(model, out, emb))
    (out / "run.json").write_text('{"created_by": "someone else"}')
    before = snapshot(out)
    with pytest.raises(ValueError, match="genpath synth did not write"):
        run_synth(synth_cfg(model, out, emb))
    assert snapshot(out) == before
    inside = tmp_path / "o2"
    inside.mkdir()
    np.save(inside / "embeddings.npy", np.load(emb).astype(np.float64))  # the input is a file the run writes
    before = snapshot(inside)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="embeddings: expected an input outside the outputs"):
            run_synth(synth_cfg(model, inside, inside / "embeddings.npy", overwrite=overwrite))
    assert snapshot(inside) == before
    # an empty folder or one with unrelated files is a fresh run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "readme.txt").write_text("x")
    assert len(run_synth(synth_cfg(model, fresh, emb))) == 4 and (fresh / "readme.txt").read_text() == "x"


def test_synth_output_inside_the_model_folder_still_resumes(tmp_path, model, emb):
    import shutil

    shutil.copytree(model, tmp_path / "m")
    cfg = synth_cfg(tmp_path / "m", tmp_path / "m" / "samples", emb)
    first = run_synth(cfg)
    assert run_synth(cfg) == read_manifest(tmp_path / "m" / "samples" / "manifest.csv") and len(first) == 4


def test_mask_synth_settings_refused_overwrite_and_resume(tmp_path, mask_pipe, model):  # noqa: F811
    mask_pipe.save_pretrained(tmp_path / "model")
    inst, types = masks()
    np.savez(tmp_path / "m.npz", instances=inst.numpy(), types=types.numpy().astype(np.int32))
    out = tmp_path / "o"

    def cfg(**kw):
        return MaskSynthConfig(**{"model": str(tmp_path / "model"), "out": str(out), "masks": str(tmp_path / "m.npz"),
                                  "steps": 1, "output_format": "png", **kw})

    assert len(run_mask_synth(cfg())) == 2
    assert json.loads((out / "run.json").read_text())["settings"]["command"] == "synth --masks"
    before = snapshot(out)
    for key, change in {"controlnet_scale": {"controlnet_scale": 0.5}, "tile": {"tile": 16},
                        "n_per_condition": {"n_per_mask": 2}}.items():
        with pytest.raises(ValueError, match=f"got different .*{key}"):
            run_mask_synth(cfg(**change))
        assert snapshot(out) == before
    np.savez(tmp_path / "m.npz", instances=inst.numpy()[:1], types=types.numpy()[:1].astype(np.int32))
    with pytest.raises(ValueError, match="different masks, n_masks"):
        run_mask_synth(cfg())
    assert snapshot(out) == before
    rows = run_mask_synth(cfg(overwrite=True))
    assert len(rows) == 1 and sorted(p.name for p in (out / "masks").iterdir()) == ["000000.npz"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png"]
    again = snapshot(out)
    assert run_mask_synth(cfg()) == read_manifest(out / "manifest.csv") and snapshot(out) == again  # resume
    with pytest.raises(ValueError, match="different command"):  # a plain synth run into a --masks folder
        run_synth(SynthConfig(model=str(model), out=str(out), embeddings=str(_emb(tmp_path)), steps=1))
    assert snapshot(out) == again


def _emb(tmp_path):
    path = tmp_path / "e12.npy"
    np.save(path, np.zeros((1, 12), np.float32))
    return path


# --- tile mode: manifests merge, stale temporaries, same-name inputs ------------------------------------------


class Identity:
    """A normalizer stand-in: keeps pixels, every tile valid."""

    def __call__(self, batch, return_valid=True):
        return batch, torch.ones(len(batch), dtype=torch.bool)


def tiles(folder, names, value=100):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        write_image(torch.full((3, 8, 8), value + i, dtype=torch.uint8), folder / name)
    return [str(folder / n) for n in names]


def by_input(out):
    rows = json.loads((out / "manifest.json").read_text())
    assert len({r["input"] for r in rows}) == len(rows)  # one row per input
    return {r["input"].rsplit("/", 1)[-1]: r for r in rows}


@pytest.mark.parametrize("command", ["normalize", "translate"])
def test_tile_manifest_merges_rows_across_runs(tmp_path, command):
    def run(inputs):
        if command == "normalize":
            return normalize_tiles(inputs, tmp_path / "out", Identity())
        return translate_tiles(inputs, tmp_path / "out", lambda image: image)

    a, b = tiles(tmp_path / "in", ["a.png", "b.png"])
    assert len(run([a, b])) == 2
    first = by_input(tmp_path / "out")
    (tmp_path / "in" / "c.png").write_bytes(b"broken")
    records = run([b, str(tmp_path / "in" / "c.png")])
    assert len(records) == 2  # the return value is this run's rows
    rows = by_input(tmp_path / "out")
    assert sorted(rows) == ["a.png", "b.png", "c.png"]
    assert rows["a.png"] == first["a.png"]  # kept from the first run
    assert rows["b.png"]["status"] != "failed" and rows["c.png"]["status"] == "failed"
    # a re-run input's failure replaces its old row (no stale "done" row for it)
    (tmp_path / "in" / "a.png").write_bytes(b"broken now")
    run([a])
    assert by_input(tmp_path / "out")["a.png"]["status"] == "failed" and len(by_input(tmp_path / "out")) == 3


def test_tile_manifest_that_is_not_one_is_never_overwritten(tmp_path):
    (a,) = tiles(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    out.mkdir()
    for text in ('{"not": "a manifest"}', "[1, 2]", "{broken"):
        (out / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match="out: expected .*manifest.json to be a tile manifest"):
            normalize_tiles([a], out, Identity())
        assert (out / "manifest.json").read_text() == text and not (out / "a.png").exists()


def test_stale_temporaries_are_removed_and_never_match_output_globs(tmp_path):
    inputs = tiles(tmp_path / "in", ["a.png", "sub/b.png"])
    inputs = [str(tmp_path / "in")]
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [out / ".a.png.x8k2m1q9.png", out / "sub" / ".b.png.abc_1234.png", out / ".manifest.json.z9y8x7w6.json"]
    kept = [out / ".z.png.x8k2m1q9.png", out / ".keep", out / ".a.png", out / "notes.txt"]  # not this run's
    fresh = out / ".a.png.k3j2h1g0.png"  # may belong to a run writing into this folder right now
    for path in stale + kept + [fresh]:
        path.write_bytes(b"")
        if path != fresh:
            os.utime(path, (time.time() - 3600, time.time() - 3600))  # left by a run killed an hour ago
    normalize_tiles(inputs, out, Identity())
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept) and fresh.exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.name.startswith(".")) == [
        "a.png", "sub/b.png"]
    assert glob.glob(str(out / "*.png")) == [str(out / "a.png")]  # hidden names never match an output glob
    assert read_image(out / "sub" / "b.png")[0, 0, 0] == 101


@pytest.mark.parametrize("command", ["normalize", "translate"])
def test_same_name_inputs_are_refused_before_any_work(tmp_path, command):
    tiles(tmp_path / "A", ["x.png"])
    tiles(tmp_path / "B", ["x.png"], value=50)
    tiles(tmp_path / "C", ["y.jpg", "y.png"])
    calls = []

    def translator(image):
        calls.append(1)
        return image

    for inputs, pair in (([tmp_path / "A" / "x.png", tmp_path / "B" / "x.png"], "x.png and .*x.png"),
                         ([tmp_path / "C"], "y.jpg and .*y.png")):
        out = tmp_path / f"out_{command}"
        with pytest.raises(ValueError, match=f"^inputs: expected distinct output names, got .*{pair} both writing"):
            if command == "normalize":
                normalize_tiles(inputs, out, Identity())
            else:
                translate_tiles(inputs, out, translator)
        assert not out.exists() and not calls  # nothing written, nothing computed
    # one folder keeps relative names: the same name in two sub-folders does not collide
    both = tmp_path / "both"
    tiles(both / "A", ["x.png"])
    tiles(both / "B", ["x.png"])
    assert len(normalize_tiles([both], tmp_path / "ok", Identity())) == 2
    same = str(both / "A" / "x.png")
    assert len(normalize_tiles([same, same], tmp_path / "once", Identity())) == 1  # one file named twice: once


def test_normalize_cli_same_name_inputs_one_line(tmp_path):
    a, b = tiles(tmp_path / "A", ["x.png"]) + tiles(tmp_path / "B", ["x.png"])
    target = str(SAMPLES / "images" / "he_tiatoolbox_target.png")
    result = runner.invoke(app, ["normalize", "tiles", a, b, "--out", str(tmp_path / "o"), "--target", target,
                                 "--method", "reinhard"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "distinct output names" in errors[0], result.output
    assert not (tmp_path / "o").exists()


# --- synth-large: never over its input or a file it did not write ---------------------------------------------


def test_synth_large_refuses_inputs_and_foreign_files_and_replaces_its_own(tmp_path, model):
    grid = tmp_path / "grid.npy"
    np.save(grid, np.random.default_rng(0).normal(size=(1, 2, 12)).astype(np.float32))
    region = tmp_path / "region.png"
    write_image(torch.full((3, 16, 16), 128, dtype=torch.uint8), region)
    before = region.read_bytes()
    with pytest.raises(ValueError, match="would overwrite the input"):
        synth_large_image(model, region, from_region=region, steps=1)
    with pytest.raises(ValueError, match="would overwrite the input"):
        synth_large_image(model, tmp_path / "grid.png", embeddings=tmp_path / "grid.json", steps=1)
    assert region.read_bytes() == before
    # a neighbouring .json that synth-large did not write, or an existing image without one
    (tmp_path / "big.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="^out: expected a new file or a previous synth-large result"):
        synth_large_image(model, tmp_path / "big.png", embeddings=grid, steps=1)
    assert (tmp_path / "big.json").read_text() == '{"mine": true}' and not (tmp_path / "big.png").exists()
    with pytest.raises(ValueError, match="previous synth-large result"):
        synth_large_image(model, region, embeddings=grid, steps=1)
    assert region.read_bytes() == before and not (tmp_path / "region.json").exists()
    with pytest.raises(ValueError, match="out: expected an image file name"):
        synth_large_image(model, tmp_path / "x.json", embeddings=grid, steps=1)
    # a new file, then a rerun over its own result
    out = tmp_path / "new.png"
    report = synth_large_image(model, out, embeddings=grid, steps=1)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["created_by"] == MARKER and written["grid"] == report["grid"] == [1, 2]
    assert synth_large_image(model, out, embeddings=grid, steps=1, seed=1)["seed"] == 1
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 1


def test_synth_large_cli_foreign_out_is_one_line(tmp_path, model):
    (tmp_path / "photo.png").write_bytes(b"precious")
    np.save(tmp_path / "g.npy", np.zeros((1, 1, 12), np.float32))
    result = runner.invoke(app, ["synth-large", "--model", str(model), "--embeddings", str(tmp_path / "g.npy"),
                                 "--out", str(tmp_path / "photo.png"), "--steps", "1"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "out:" in errors[0], result.output
    assert (tmp_path / "photo.png").read_bytes() == b"precious"
