"""Hostile-input table for every command: a bad argument or config is one line naming it, exit code 2."""

import shutil

import pytest
from typer.testing import CliRunner

from genpath.cli import app
from tests.conftest import SAMPLES

runner = CliRunner()
TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")
TILE = str(SAMPLES / "tiles" / "pcam" / "label0_patch0000000.jpg")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "syntax.yaml").write_text("normalize: {method: [}\n")
    (tmp_path / "unknown.yaml").write_text("normalize: {methd: macenko}\n")
    (tmp_path / "type.yaml").write_text("normalize: {batch_size: many}\n")
    (tmp_path / "train_unknown.yaml").write_text("vae: {data: {roots: [x]}, options: {kl_wieght: 1.0}}\n")
    (tmp_path / "train_type.yaml").write_text("vae: {data: {roots: [x]}, train: {max_steps: ten}}\n")
    (tmp_path / "no_section.yaml").write_text("ldm: {}\n")
    (tmp_path / "bad_options.yaml").write_text(f"normalize: {{target: [{TARGET}], options: {{bogus: 1}}}}\n")
    (tmp_path / "bad_slide.yaml").write_text(f"normalize: {{target: [{TARGET}], slide: {{tile_size: big}}}}\n")
    (tmp_path / "bad_model.yaml").write_text("vae: {data: {roots: [x]}, model: {bogus: 1}}\n")
    (tmp_path / "not_an_image.png").write_bytes(b"not an image")
    shutil.copy(TILE, tmp_path / "tile.jpg")
    (tmp_path / "not_a_state.safetensors").write_bytes(b"garbage")
    return tmp_path


CASES = [
    (["normalize", "tiles", TILE, "--out", "{o}"], "--target"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", TARGET, "--method", "nope"], "method"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", TARGET, "--format", "tiff"], "format"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", TARGET, "--batch-size", "0"], "batch_size"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", TARGET, "--on-invalid", "explode"], "on_invalid"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--config", "{d}/syntax.yaml"], "syntax error"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--config", "{d}/unknown.yaml"], "methd"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--config", "{d}/type.yaml"], "batch_size"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--config", "{d}/missing.yaml"], "config"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", "{d}/nothing*.png"], "target"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--state", "{d}/missing.safetensors"], "path"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--state", "{d}/not_a_state.safetensors"], "path"),
    (["normalize", "tiles", "{d}/tile.jpg", "--out", "{o}", "--target", TARGET, "--save-state", "{d}/tile.jpg"],
     "save_state"),
    (["normalize", "tiles", "{d}/nothing*.png", "--out", "{o}", "--target", TARGET], "no match"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--format", "png"], "format"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--overlap", "9999"], "overlap"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--mpp", "nan"], "mpp"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--tile-size", "100"], "tile_size"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--compression", "lzw"], "compression"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", TARGET, "--executor", "spark"], "executor"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--config", "{d}/bad_options.yaml"], "options"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", "{d}/not_an_image.png"], "target"),
    (["normalize", "slides", TILE, "--out", "{o}", "--config", "{d}/bad_slide.yaml"], "tile_size"),
    (["normalize", "slides", TILE, "--out", "{o}"], "--target"),
    (["normalize", "slides", TILE, "--out", "{o}", "--target", "{d}/nothing*.png"], "target"),
    (["normalize", "tiles", TILE, "--out", "{o}", "--target", TARGET, "--method", "[bold]x[/bold]"], "[bold]x[/bold]"),
    (["train", "vae", "--config", "{d}/missing.yaml"], "config"),
    (["train", "vae", "--config", "{d}/bad_model.yaml"], "bogus"),
    (["train", "vae", "--config", "{d}/train_unknown.yaml"], "kl_wieght"),
    (["train", "vae", "--config", "{d}/train_type.yaml"], "max_steps"),
    (["train", "vae", "--config", "{d}/no_section.yaml"], "'vae' section"),
    (["train", "vae", "--config", "{d}/syntax.yaml"], "syntax error"),
    (["translate", "tiles", TILE, "--model", "{d}/no_model", "--out", "{o}"], "model"),
    (["translate", "slides", TILE, "--model", "{d}/no_model", "--out", "{o}", "--format", "png"], "format"),
    (["synth", "--model", "{d}/no_model", "--out", "{o}", "--from-images", TILE], "model"),
    (["synth-large", "--model", "{d}/no_model", "--out", "{o}/x.png"], "from_region"),
    (["synth-large", "--model", "{d}/no_model", "--out", "{d}/tile.jpg", "--embeddings", "{d}/g.npy"],
     "previous synth-large result"),
    (["synth-large", "--model", "{d}/no_model", "--out", "{d}/syntax.yaml", "--embeddings", "{d}/g.npy"],
     "image file name"),
]


@pytest.mark.parametrize(("args", "fragment"), CASES, ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else v)
def test_bad_input_is_one_named_line(files, args, fragment):
    argv = [a.format(d=files, o=files / "out") for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, (argv, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_unknown_train_kind_and_missing_option_are_usage_errors():
    assert runner.invoke(app, ["train", "gan", "--config", "x.yaml"]).exit_code == 2
    assert runner.invoke(app, ["normalize", "tiles", TILE]).exit_code == 2  # --out missing


def test_old_automatic_form_still_works_with_a_notice(tmp_path):
    result = runner.invoke(app, ["normalize", TILE, "--out", str(tmp_path / "o"), "--target", TARGET])
    assert result.exit_code == 0, result.output
    assert "deprecated" in result.output and "normalize tiles" in result.output
    assert (tmp_path / "o" / "label0_patch0000000.png").is_file()
