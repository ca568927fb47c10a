import json
import shutil

import torch
from typer.testing import CliRunner

from genpath.cli import app
from genpath.io.images import read_image, write_image
from tests.conftest import SAMPLES, STAINS_A, concentrations, render

runner = CliRunner()


def test_normalize_folder_writes_outputs_and_keeps_inputs(tmp_path):
    src = tmp_path / "in"
    shutil.copytree(SAMPLES / "tiles" / "pcam", src)
    (src / "broken.png").write_bytes(b"not an image")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    result = runner.invoke(app, ["normalize", "tiles", str(src), "--out", str(out), "--method", "macenko",
                                 "--target", str(SAMPLES / "images" / "he_tiatoolbox_target.png"),
                                 "--save-state", str(tmp_path / "state.safetensors")])
    assert result.exit_code == 1  # the broken file fails, the rest is written
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    manifest = json.loads((out / "manifest.json").read_text())
    statuses = {rec["input"].split("/")[-1]: rec["status"] for rec in manifest}
    assert statuses.pop("broken.png") == "failed"
    assert set(statuses.values()) <= {"normalized", "passed_through"} and len(statuses) == 16
    written = read_image(out / "label0_patch0000000.png")
    assert written.shape == (3, 96, 96)
    # a saved state gives the same result
    again = tmp_path / "again"
    result = runner.invoke(app, ["normalize", "tiles", str(src / "label0_patch0000000.jpg"), "--out", str(again),
                                 "--state", str(tmp_path / "state.safetensors")])
    assert result.exit_code == 0, result.output
    assert torch.equal(read_image(again / "label0_patch0000000.png"), written)


def test_normalize_with_config_and_refuses_to_overwrite_inputs(tmp_path):
    tile = render(concentrations(1, 32), STAINS_A)[0]
    write_image(tile, tmp_path / "a.png")
    config = tmp_path / "run.yaml"
    config.write_text(f"normalize:\n  method: reinhard\n  target: [{tmp_path / 'a.png'}]\n")
    result = runner.invoke(app, ["normalize", "tiles", str(tmp_path / "a.png"), "--out", str(tmp_path),
                                 "--config", str(config)])
    assert result.exit_code == 1 and "overwrite" in result.output
    assert torch.equal(read_image(tmp_path / "a.png"), (tile * 255).round().to(torch.uint8))


def test_normalize_errors(tmp_path):
    result = runner.invoke(app, ["normalize", "tiles", str(SAMPLES / "tiles"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--target" in result.output
    result = runner.invoke(app, ["normalize", "tiles", str(tmp_path / "missing*.png"), "--out", str(tmp_path),
                                 "--target", str(SAMPLES / "images" / "he_tiatoolbox_target.png")])
    assert result.exit_code != 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("normalize:\n  method: nope\n")
    result = runner.invoke(app, ["normalize", "tiles", str(SAMPLES / "tiles"), "--out", str(tmp_path), "--config",
                                 str(bad)])
    # a bad config is one line naming the key (exit code 2), never a traceback
    assert result.exit_code == 2 and "method" in result.output and "Traceback" not in result.output


def test_first_command_prints_no_deprecation_noise(tmp_path):
    """A user's first `genpath normalize` shows no FutureWarning/DeprecationWarning (kornia, diffusers, click)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "genpath"
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # also show DeprecationWarnings, which Python hides
    result = subprocess.run([str(exe), "normalize", "tiles", str(SAMPLES / "tiles" / "pcam"), "--target",
                             str(SAMPLES / "images" / "he_tiatoolbox_target.png"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warn(" not in result.stderr, result.stderr
