"""Careless-user cases across commands: outputs that are files, unreachable schedulers, --debug, odd folders."""

import shutil

import pytest
from typer.testing import CliRunner

from genpath.cli import app
from tests.conftest import SAMPLES

runner = CliRunner()
TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")
SLIDE = SAMPLES / "slides"


@pytest.mark.parametrize("command", [["normalize", "tiles", str(SAMPLES / "tiles" / "pcam")],
                                     ["normalize", "slides", str(SLIDE)]])
def test_out_that_is_a_file_is_one_line(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    result = runner.invoke(app, [*command, "--target", TARGET, "--out", str(afile)])
    assert result.exit_code == 2 and "error: out: expected an output folder" in result.output
    assert afile.read_bytes() == b"mine"


def test_debug_shows_the_traceback_instead(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    result = runner.invoke(app, ["--debug", "normalize", "tiles", str(SAMPLES / "tiles" / "pcam"), "--target", TARGET,
                                 "--out", str(afile)])
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


def test_unreachable_dask_scheduler_is_one_line(tmp_path):
    result = runner.invoke(app, ["normalize", "slides", str(SLIDE), "--target", TARGET, "--out", str(tmp_path / "o"),
                                 "--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2 and "error: scheduler: expected a reachable dask scheduler" in result.output


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
def test_a_broken_tif_among_tiles_does_not_switch_to_slide_mode(tmp_path):
    shutil.copytree(SAMPLES / "tiles" / "pcam", tmp_path / "in")
    (tmp_path / "in" / "broken.tif").write_bytes(b"II*\x00garbage")
    result = runner.invoke(app, ["normalize", str(tmp_path / "in"), "--target", TARGET, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1  # the old automatic form: tiles, with the broken file failed
    assert (tmp_path / "o" / "manifest.json").is_file() and not (tmp_path / "o" / "manifest.csv").exists()


def test_slide_output_inside_the_input_folder_is_not_reprocessed(tmp_path):
    shutil.copytree(SLIDE, tmp_path / "slides")
    args = ["normalize", "slides", str(tmp_path / "slides"), "--target", TARGET, "--out",
            str(tmp_path / "slides" / "out"), "--tile-size", "256"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "already done (resumed) 1" in second.output
    assert "slides normalized 0" in second.output  # its own QC PNGs and outputs were not taken as inputs


def test_controlnet_without_its_base_names_the_option(tmp_path):
    result = runner.invoke(app, ["synth", "--model", str(SAMPLES / "checkpoints" / "controlnet_hgsc"), "--masks",
                                 str(SAMPLES / "masks" / "hgsc_nest_heldout_tiles.npz"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--base" in result.output and not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_synth_never_runs_a_torchscript_named_by_the_model_folder(tmp_path):
    import json

    import torch

    from tests.genpath.test_trust_boundary import WritesAFile

    model = tmp_path / "ldm"
    shutil.copytree(SAMPLES / "checkpoints" / "ldm_small", model)
    marker = tmp_path / "marker.pt"
    torch.jit.script(WritesAFile(str(marker))).save(str(model / "enc.pt"))
    (model / "encoder.json").write_text(json.dumps({"name": "torchscript", "kwargs": {"path": "enc.pt"}}))
    tile = str(SAMPLES / "tiles" / "pcam" / "label0_patch0000000.jpg")
    for command in (["synth", "--model", str(model), "--from-images", tile, "--out", str(tmp_path / "o")],
                    ["synth-large", "--model", str(model), "--from-region", str(SAMPLES / "images" /
                     "he_tiatoolbox_target.png"), "--out", str(tmp_path / "large.png")]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "runs code from a file" in result.output, result.output
        assert not marker.exists()


@pytest.mark.parametrize(("block", "fragment"), [
    ("model: {block_out_channels: [0, -3, 128], cross_attention_dim: -1}",
     "model: expected a valid UNet2DConditionModel"),
    ("options: {num_tokens: -2}", "options.num_tokens"),
    ("options: {cond_dropout: .nan}", "cond_dropout"),
])
def test_train_model_and_option_values_are_checked_before_training(tmp_path, block, fragment):
    config = tmp_path / "ldm.yaml"
    config.write_text(f"ldm:\n  data: {{roots: [{SAMPLES / 'tiles' / 'pcam'}], size: 32}}\n"
                      f"  options: {{vae: x, encoder: genpath-small}}\n  {block}\n".replace(
                          "  options: {vae: x, encoder: genpath-small}\n  options: {",
                          "  options: {vae: x, encoder: genpath-small, "))
    result = runner.invoke(app, ["train", "ldm", "--config", str(config), "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output
