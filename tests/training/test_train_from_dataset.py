"""Slides → ``genpath tiles`` → ``genpath embed`` → ``genpath train`` reading tiles and precomputed embeddings."""

from __future__ import annotations

import json

import torch
import yaml
from typer.testing import CliRunner

from genpath.cli import app
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
ENCODER = "genpath-small.samples"


def make_dataset(tmp_path):
    ds = tmp_path / "ds.zarr"
    result = CliRunner().invoke(app, ["tiles", str(ROOT / "samples" / "slides"), "--out", str(ds), "--mpp", "2.0",
                                      "--tile-size", "32", "--max-tiles-per-slide", "8"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["embed", str(ds), "--encoder", ENCODER])
    assert result.exit_code == 0, result.output
    return ds


def config_for(tmp_path, kind, data):
    raw = yaml.safe_load(TINY.read_text())[kind]
    raw["data"] = data
    raw["train"].update({"sample_every": 1000, "checkpoint_every": 1000})
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({kind: raw}))
    return path


def test_ldm_and_histaug_train_on_precomputed_embeddings_without_reencoding(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path)
    import zarr

    group = zarr.open_group(str(ds), mode="r")
    n = group["images"].shape[0]
    assert n > 0 and group["coords"].shape == (n, 2) and group[f"embeddings/{ENCODER}"].shape[0] == n

    from genpath.encoders.small_cnn import SmallHistologyEncoder

    calls = {"n": 0}
    forward = SmallHistologyEncoder.forward

    def counting(self, x):
        calls["n"] += 1
        return forward(self, x)

    monkeypatch.setattr(SmallHistologyEncoder, "forward", counting)
    from genpath.training.run import run_training

    data = {"zarr": str(ds), "embeddings": ENCODER, "size": 32}
    out = run_training("ldm", config_for(tmp_path, "ldm", data), max_steps=2, output_dir=tmp_path / "ldm")
    assert calls["n"] == 0  # the LDM never re-encoded a tile
    assert (out / "model_index.json").is_file()
    log = [json.loads(line) for line in (tmp_path / "ldm" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)

    histaug = config_for(tmp_path, "histaug", data)
    raw = yaml.safe_load(histaug.read_text())
    raw["histaug"]["options"] = {"encoder": ENCODER}
    histaug.write_text(yaml.safe_dump(raw))
    run_training("histaug", histaug, max_steps=1, output_dir=tmp_path / "histaug")
    assert not (tmp_path / "histaug" / "clean_embeddings.zarr").exists()  # the dataset's embeddings were used
    assert (tmp_path / "histaug" / "model" / "config.json").is_file()
    assert calls["n"] > 0  # the counter does see the encoder: HistAug embeds its augmented tiles
