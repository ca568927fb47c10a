"""Tile mode under pressure: memory budget, foreign state files, kill -9, two runs at once, a full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genpath.io.images import read_image
from normalization import MacenkoNormalizer
from normalization.tiles import normalize_tiles
from tests.conftest import SAMPLES

TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")
EXE = str(Path(sys.executable).parent / "genpath")


class Recording(torch.nn.Module):
    """Wraps a fitted normalizer and records the shape of every batch it gets."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, images, return_valid=False):
        self.shapes.append(tuple(images.shape))
        return self.inner(images, return_valid=return_valid)


@pytest.fixture(scope="module")
def fitted():
    return MacenkoNormalizer().fit(read_image(TARGET)[:, :256, :256])


def test_batches_respect_the_pixel_budget(tmp_path, fitted):
    recording = Recording(fitted)
    records = normalize_tiles([SAMPLES / "tiles" / "pcam"], tmp_path / "o", recording, batch_size=32,
                              max_batch_pixels=3 * 96 * 96)
    assert len(records) == 16 and all(r["status"] != "failed" for r in records)
    assert max(s[0] for s in recording.shapes) == 3 and sum(s[0] for s in recording.shapes) == 16
    with pytest.raises(ValueError, match="max_batch_pixels"):
        normalize_tiles([SAMPLES / "tiles" / "pcam"], tmp_path / "o", fitted, max_batch_pixels=0)


def test_save_state_never_replaces_a_file_genpath_did_not_write(tmp_path):
    from typer.testing import CliRunner

    from genpath.cli import app

    foreign = tmp_path / "notes.safetensors"
    foreign.write_bytes(b"my notes")
    result = CliRunner().invoke(app, ["normalize", "tiles", str(SAMPLES / "tiles" / "pcam"), "--target", TARGET,
                                      "--out", str(tmp_path / "o"), "--save-state", str(foreign)])
    assert result.exit_code == 2 and "save_state: expected a new file" in result.output
    assert foreign.read_bytes() == b"my notes" and not (tmp_path / "o").exists()
    ok = CliRunner().invoke(app, ["normalize", "tiles", str(SAMPLES / "tiles" / "pcam"), "--target", TARGET,
                                  "--out", str(tmp_path / "o"), "--save-state", str(tmp_path / "s.safetensors")])
    assert ok.exit_code == 0
    again = CliRunner().invoke(app, ["normalize", "tiles", str(SAMPLES / "tiles" / "pcam"), "--target", TARGET,
                                     "--out", str(tmp_path / "o"), "--save-state", str(tmp_path / "s.safetensors")])
    assert again.exit_code == 0  # its own earlier state may be replaced


def _many_tiles(folder: Path, n: int) -> Path:
    folder.mkdir()
    tiles = sorted((SAMPLES / "tiles" / "pcam").glob("*"))
    for i in range(n):
        shutil.copy(tiles[i % len(tiles)], folder / f"t{i:04d}{tiles[i % len(tiles)].suffix}")
    return folder


def _outputs_are_whole(out: Path) -> None:
    for png in out.glob("*.png"):
        assert read_image(png).shape[0] == 3  # decodes: never half-written
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_kill_9_then_rerun_gives_a_complete_manifest(tmp_path):
    src = _many_tiles(tmp_path / "in", 400)
    out = tmp_path / "out"
    args = [EXE, "normalize", "tiles", str(src), "--target", TARGET, "--out", str(out), "--batch-size", "8"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.png"))) < 40 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for png in out.glob("*.png"):
        if not png.name.startswith("."):  # the killed run's hidden temporary (its pid is dead) is not an output
            read_image(png)  # every output present is whole (atomic writes)
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "manifest.json").read_text())
    assert len(rows) == 400 and {r["status"] for r in rows} <= {"normalized", "passed_through"}
    _outputs_are_whole(out)


def test_two_runs_at_once_into_one_folder(tmp_path):
    src = _many_tiles(tmp_path / "in", 120)
    out = tmp_path / "out"
    args = [EXE, "normalize", "tiles", str(src), "--target", TARGET, "--out", str(out), "--batch-size", "8"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    rows = json.loads((out / "manifest.json").read_text())
    assert {Path(r["input"]).name for r in rows} == {p.name for p in src.iterdir()}
    assert len(list(out.glob("*.png"))) == 120
    _outputs_are_whole(out)


def test_a_full_disk_fails_items_cleanly(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail with EFBIG (Python ignores SIGXFSZ)."""
    src = _many_tiles(tmp_path / "in", 16)
    out = tmp_path / "out"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (12000, 12000)); "
            "from genpath.cli import main; sys.argv = ['genpath', 'normalize', 'tiles', sys.argv[1], '--target', "
            "sys.argv[2], '--out', sys.argv[3]]; main()")
    result = subprocess.run([sys.executable, "-c", code, str(src), TARGET, str(out)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr
    assert "File too large" in result.stderr or "failed" in result.stderr
    _outputs_are_whole(out)


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path):
    from typer.testing import CliRunner

    from genpath.cli import app

    src = _many_tiles(tmp_path / "in", 6)
    out = tmp_path / "out"
    base = ["normalize", "tiles", str(src), "--target", TARGET, "--out", str(out)]
    assert CliRunner().invoke(app, [*base, "--method", "reinhard"]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    refused = CliRunner().invoke(app, [*base, "--method", "macenko"])
    assert refused.exit_code == 2 and "different method" in refused.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    same = CliRunner().invoke(app, ["normalize", "tiles", str(src / "t0000.jpg"), "--target", TARGET, "--out",
                                    str(out), "--method", "reinhard"])
    assert same.exit_code == 0  # the same settings on a subset: fine, rows merge
    replaced = CliRunner().invoke(app, [*base, "--method", "macenko", "--overwrite"])
    assert replaced.exit_code == 0
    assert all(before[p.name] != p.read_bytes() for p in out.glob("*.png"))
    assert json.loads((out / "run.json").read_text())["settings"]["method"] == "macenko"
    assert len(json.loads((out / "manifest.json").read_text())) == 6
