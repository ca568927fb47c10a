"""Hostile and careless input to ``genpath synth`` and ``synth --masks`` (issue 21, items 3-5).

Bad options and files are one ``error:`` line naming the argument (exit 2) before any output is
written; one unreadable image or mask file among several is a failed manifest row (exit 1) while
the others are generated.
"""

import csv
import pickle
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from genpath.cli import app
from genpath.encoders import SmallHistologyEncoder
from genpath.encoders.reference import save_encoder_reference
from genpath.synth import MAX_SAMPLES, SynthConfig, batches, load_embeddings
from genpath.synth_masks import MaskSynthConfig
from tests.conftest import SAMPLES
from tests.genpath.test_mask_pipeline import ldm_dir, mask_pipe, masks  # noqa: F401 - fixtures
from tests.genpath.test_pipeline import pipe  # noqa: F401 - fixture

runner = CliRunner()
GOOD_TILES = sorted((SAMPLES / "tiles" / "pcam").glob("*.jpg"))[:2]


@pytest.fixture(scope="module")
def model(tmp_path_factory, pipe):  # noqa: F811
    """A tiny EmbeddingToImagePipeline (16 px) with a genpath-small encoder.json."""
    folder = tmp_path_factory.mktemp("synth_hostile") / "pipe"
    pipe.save_pretrained(folder)
    SmallHistologyEncoder(widths=(8, 16), embed_dim=12, input_size=32).save_pretrained(folder.parent / "enc")
    save_encoder_reference(folder, "genpath-small", {"path": folder.parent / "enc"})
    return folder


@pytest.fixture(scope="module")
def mask_model(tmp_path_factory, mask_pipe, ldm_dir):  # noqa: F811
    """A tiny MaskToImagePipeline (32 px, VAE factor 2, 3 nucleus types) with an encoder.json for --style-from."""
    folder = tmp_path_factory.mktemp("mask_hostile") / "model"
    mask_pipe.save_pretrained(folder)
    save_encoder_reference(folder, "genpath-small", {"path": ldm_dir.parent / "encoder"})
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every hostile input file of the table, by name."""
    d = tmp_path_factory.mktemp("hostile_inputs")
    rng = np.random.default_rng(0)
    np.save(d / "good.npy", rng.normal(size=(2, 12)).astype(np.float32))
    (d / "empty.npy").write_bytes(b"")
    (d / "text.npy").write_text("0.1, 0.2\n")
    np.save(d / "rows0.npy", np.zeros((0, 12), np.float32))
    np.save(d / "rank1.npy", np.zeros(12, np.float32))
    np.save(d / "rank3.npy", np.zeros((2, 1, 12), np.float32))
    np.save(d / "strings.npy", np.array([["a"] * 12] * 2))
    np.save(d / "bools.npy", np.ones((2, 12), bool))
    np.save(d / "complex.npy", np.ones((2, 12), np.complex64))
    np.save(d / "nan.npy", np.full((2, 12), np.nan, np.float32))
    np.save(d / "inf.npy", np.full((2, 12), np.inf, np.float64))
    np.save(d / "huge.npy", np.full((2, 12), 1e300))  # inf once float32
    np.save(d / "objects.npy", np.array([None, 1, "x"], dtype=object), allow_pickle=True)
    np.savez(d / "archive.npz", embeddings=np.zeros((2, 12), np.float32))
    (d / "pickle.npy").write_bytes(pickle.dumps(np.zeros((2, 12), np.float32)))  # never unpickled
    (d / "truncated.npy").write_bytes((d / "good.npy").read_bytes()[:-20])
    np.save(d / "wrong_dim.npy", np.zeros((2, 5), np.float32))
    inst, types = masks()
    np.savez(d / "m.npz", instances=inst.numpy(), types=types.numpy())
    np.savez(d / "m4d.npz", instances=inst.numpy()[None])
    np.savez(d / "m1d.npz", instances=np.arange(32))
    np.savez(d / "mfloat.npz", instances=inst.numpy().astype(np.float32))
    np.savez(d / "mobject.npz", instances=np.array([None], dtype=object))
    np.savez(d / "mtypes.npz", instances=inst.numpy(), types=types.numpy()[:, :16])
    np.savez(d / "mnegative.npz", instances=-inst.numpy())
    (d / "mbroken.npz").write_bytes(b"PK\x03\x04 not a zip")
    (d / "mpickle.npz").write_bytes(pickle.dumps({"instances": inst.numpy()}))
    (d / "bad.png").write_bytes(b"not an image")
    (d / "noimages").mkdir()
    (d / "allbad").mkdir()
    (d / "allbad" / "a.png").write_bytes(b"junk")
    (d / "allbad" / "b.jpg").write_bytes(b"")
    (d / "badmasks").mkdir()
    (d / "badmasks" / "x.npz").write_bytes(b"junk")
    return d


EMB = ["--embeddings", "{d}/good.npy"]
MASKS = ["--masks", "{d}/m.npz"]
CASES = [  # (arguments after synth --model M --out O, the argument named, more text the line holds)
    (["--embeddings", "{d}/empty.npy"], "embeddings", "empty.npy (an empty file)"),
    (["--embeddings", "{d}/text.npy"], "embeddings", "text.npy (not a .npy file)"),
    (["--embeddings", "{d}/pickle.npy"], "embeddings", "pickle.npy (not a .npy file)"),
    (["--embeddings", "{d}/truncated.npy"], "embeddings", "truncated.npy ("),
    (["--embeddings", "{d}/rows0.npy"], "embeddings", "(0, 12)"),
    (["--embeddings", "{d}/rank1.npy"], "embeddings", "(12,)"),
    (["--embeddings", "{d}/rank3.npy"], "embeddings", "(2, 1, 12)"),
    (["--embeddings", "{d}/strings.npy"], "embeddings", "dtype <U1"),
    (["--embeddings", "{d}/bools.npy"], "embeddings", "dtype bool"),
    (["--embeddings", "{d}/complex.npy"], "embeddings", "complex64"),
    (["--embeddings", "{d}/nan.npy"], "embeddings", "NaN or inf"),
    (["--embeddings", "{d}/inf.npy"], "embeddings", "NaN or inf"),
    (["--embeddings", "{d}/huge.npy"], "embeddings", "beyond float32"),
    (["--embeddings", "{d}/objects.npy"], "embeddings", "Python objects"),
    (["--embeddings", "{d}/archive.npz"], "embeddings", "archive.npz (not a .npy file)"),
    (["--embeddings", "{d}/wrong_dim.npy"], "embeddings", "(B,12)"),
    (["--embeddings", "{d}/missing.npy"], "embeddings", "missing"),
    ([*EMB, "--guidance", "nan"], "guidance", "nan"),
    ([*EMB, "--guidance", "inf"], "guidance", "inf"),
    ([*EMB, "--guidance", "-1"], "guidance", "[0, 100]"),
    ([*EMB, "--n-per-condition", "0"], "n_per_condition", "got 0"),
    ([*EMB, "--n-per-condition", "100000000000"], "n_per_condition", "100000000000"),
    ([*EMB, "--n-per-condition", "6000000"], "n_per_condition", "2 conditions x 6000000 = 12000000"),
    ([*EMB, "--batch-size", "0"], "batch_size", "got 0"),
    ([*EMB, "--batch-size", "100000000"], "batch_size", "[1, 1024]"),
    ([*EMB, "--steps", "0"], "steps", "got 0"),
    ([*EMB, "--seed", str(2**63)], "seed", str(2**63)),
    (["--from-images", "{d}/allbad"], "from_images", "none of 2"),
    (["--from-images", "{d}/noimages"], "from_images", "at least one image"),
    (["--from-images", "{d}/nowhere.png"], "from_images", "no match"),
    ([*MASKS, "--tile", "0"], "tile", "got 0"),
    ([*MASKS, "--tile", "-32"], "tile", "got -32"),
    ([*MASKS, "--tile", "15"], "tile", "multiple of the VAE factor 2"),
    (["--masks", "{d}/m4d.npz"], "masks", "shape (1, 2, 32, 32)"),
    (["--masks", "{d}/m1d.npz"], "masks", "shape (32,)"),
    (["--masks", "{d}/mfloat.npz"], "masks", "integer label maps"),
    (["--masks", "{d}/mobject.npz"], "masks", "m" + "object.npz"),
    (["--masks", "{d}/mtypes.npz"], "masks", "types of shape"),
    (["--masks", "{d}/mnegative.npz"], "masks", "non-negative"),
    (["--masks", "{d}/mbroken.npz"], "masks", "BadZipFile"),
    (["--masks", "{d}/mpickle.npz"], "masks", "mpickle.npz (not a .npz archive)"),
    (["--masks", "{d}/badmasks"], "masks", "1 unreadable"),
    ([*MASKS, "--controlnet-scale", "nan"], "controlnet_scale", "nan"),
    ([*MASKS, "--controlnet-scale", "inf"], "controlnet_scale", "inf"),
    ([*MASKS, "--guidance", "nan"], "guidance", "nan"),
    ([*MASKS, "--n-per-condition", "6000000"], "n-per-condition", "2 masks x 6000000"),
    ([*MASKS, "--batch-size", "5000"], "batch_size", "[1, 1024]"),
    ([*MASKS, "--style-from", "{d}/allbad"], "style_from", "none of 2"),
]


@pytest.mark.parametrize(("args", "argument", "detail"), CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_naming_the_argument_and_writes_nothing(tmp_path, model, mask_model, files, args,
                                                                     argument, detail):
    out = tmp_path / "out"
    chosen = mask_model if "--masks" in args else model
    argv = ["synth", "--model", str(chosen), "--out", str(out), "--steps", "1",
            *(a.format(d=files) for a in args)]
    result = runner.invoke(app, argv)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert argument in errors[0].split(": ")[1], errors[0]  # the line starts by naming the argument
    assert detail in errors[0] and "Traceback" not in result.output, errors[0]
    assert not out.exists()  # refused before any output


def test_configs_refuse_nan_and_out_of_range_numbers():
    for kw, name in (({"guidance": float("nan")}, "guidance"), ({"n_per_condition": float("nan")}, "n_per_condition"),
                     ({"batch_size": True}, "batch_size"), ({"seed": -(2**63) - 1}, "seed")):
        with pytest.raises(ValueError, match=f"^{name}: expected"):
            SynthConfig(model="m", out="o", embeddings="e.npy", **kw)
    for kw, name in (({"controlnet_scale": float("nan")}, "controlnet_scale"), ({"guidance": float("inf")}, "guidance"),
                     ({"tile": 0}, "tile"), ({"tile": 16.0}, "tile"), ({"n_per_mask": MAX_SAMPLES + 1}, "n_per_mask")):
        with pytest.raises(ValueError, match=f"^{name}"):
            MaskSynthConfig(model="m", out="o", masks="x.npz", **kw)


def test_sample_ids_are_generated_one_batch_at_a_time(tmp_path):
    lazy = batches(10**15, {1, 2}, 3)  # a list of this length could never be built
    assert next(lazy) == [0, 3, 4] and next(lazy) == [5, 6, 7]
    assert list(batches(5, {0, 4}, 2)) == [[1, 2], [3]]
    np.save(tmp_path / "i.npy", np.arange(24, dtype=np.int16).reshape(2, 12))  # integers are numbers too
    loaded = load_embeddings(tmp_path / "i.npy")
    assert loaded.dtype == np.float32 and loaded[1, 11] == 23


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_unreadable_reference_image_is_a_failed_row_and_the_others_are_generated(tmp_path, model):
    images = tmp_path / "refs"
    images.mkdir()
    for path in GOOD_TILES:
        shutil.copy(path, images / path.name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "o"
    args = ["synth", "--model", str(model), "--from-images", str(images), "--n-per-condition", "2", "--steps", "1",
            "--format", "png", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert text.startswith("4 samples") and "1 inputs failed" in text and "Traceback" not in text
    assert "failed " + str(images / "broken.png") in text
    rows = _manifest(out)
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert [int(r["id"]) for r in done] == [0, 1, 2, 3] and all((out / r["file"]).is_file() for r in done)
    assert {r["source"] for r in done} == {str(images / p.name) for p in GOOD_TILES}
    assert len(failed) == 1 and failed[0]["source"].endswith("broken.png") and failed[0]["id"] == ""
    assert "image: expected" in failed[0]["error"] and failed[0]["file"] == ""
    assert np.load(out / "embeddings.npy").shape == (2, 12)  # only the readable conditions
    before = (out / "manifest.csv").read_bytes()
    again = runner.invoke(app, args)  # resume: nothing to redo, the failure is reported again, not duplicated
    assert again.exit_code == 1 and (out / "manifest.csv").read_bytes() == before, again.output


def test_mask_synth_bad_style_image_and_bad_mask_file_are_failed_rows(tmp_path, mask_model, files):
    inst, types = masks()
    folder = tmp_path / "masks"
    folder.mkdir()
    np.savez(folder / "a.npz", instances=inst.numpy(), types=types.numpy())
    np.savez(folder / "b.npz", instances=inst.numpy()[None])  # 4-D: refused, this file only
    (folder / "c.npz").write_bytes(b"junk")
    styles = tmp_path / "styles"
    styles.mkdir()
    shutil.copy(GOOD_TILES[0], styles / GOOD_TILES[0].name)
    (styles / "z.png").write_bytes(b"not an image")
    out = tmp_path / "o"
    result = runner.invoke(app, ["synth", "--model", str(mask_model), "--masks", str(folder), "--style-from",
                                 str(styles), "--n-per-condition", "1", "--steps", "1", "--format", "png", "--out",
                                 str(out)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    assert text.startswith("2 (image, mask) pairs") and "3 inputs failed" in text and "Traceback" not in text
    rows = _manifest(out)
    done = [r for r in rows if r["status"] == "done"]
    assert [r["mask_source"] for r in done] == ["a.npz[0]", "a.npz[1]"]
    assert all((out / r["file"]).is_file() and (out / r["mask_file"]).is_file() for r in done)
    assert all(r["style"].endswith(GOOD_TILES[0].name) for r in done)
    failed = {(r["mask_source"] or r["style"]).rsplit("/", 1)[-1]: r["error"] for r in rows if r["status"] == "failed"}
    assert sorted(failed) == ["b.npz", "c.npz", "z.png"]
    assert "shape (1, 2, 32, 32)" in failed["b.npz"] and failed["c.npz"].startswith("masks: expected a readable")
    assert failed["z.png"].startswith("image: expected")
    assert torch.equal(torch.from_numpy(np.load(out / done[0]["mask_file"])["instances"]).long(), inst[0])
