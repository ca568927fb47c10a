"""Training on two processes (torchrun, gloo, CPU): it finishes, logs and saves once, and follows one process.

The 2-process runs launch the real console script, as a user would
(``torchrun --nproc_per_node 2 $(which genpath) train KIND --config configs/tiny.yaml``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
GENPATH = Path(sys.executable).parent / "genpath"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, out: Path, processes: int, *extra: str, config: Path = TINY, timeout: int = 600
           ) -> subprocess.CompletedProcess:
    """Run ``genpath train`` on ``processes`` CPU processes (torchrun) or directly (1)."""
    command = [str(GENPATH), "train", kind, "--config", str(config), "--output-dir", str(out), *extra]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def write_config(tmp_path: Path, kind: str, batch_size: int, steps: int, **train: object) -> Path:
    """The tiny config's ``kind`` section with another batch size, step count and train settings."""
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    section = raw[kind]
    section["train"].update({"batch_size": batch_size, "max_steps": steps, "checkpoint_every": steps,
                             "sample_every": 1000, "log_every": 1, **train})
    path = tmp_path / f"{kind}_{batch_size}.yaml"
    path.write_text(yaml.safe_dump({kind: section}))
    return path


def test_two_processes_follow_one_process_with_twice_the_batch(tmp_path):
    """VAE, 3 steps: 2 processes × batch 2 give the loss curve and weights of 1 process × batch 4."""
    one = tmp_path / "one"
    launch("vae", one, 1, config=write_config(tmp_path, "vae", 4, 3))
    two = tmp_path / "two"
    launch("vae", two, 2, config=write_config(tmp_path, "vae", 2, 3))
    a, b = log_of(one), log_of(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]  # each step logged once
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "l1", "ssim_loss", "kl"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)
    from safetensors.torch import load_file

    wa = load_file(one / "model" / "diffusion_pytorch_model.safetensors")
    wb = load_file(two / "model" / "diffusion_pytorch_model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000003"]


@pytest.mark.slow
def test_ldm_on_two_processes_follows_one_process(tmp_path):
    """The LDM (frozen VAE and encoder, trained UNet + projector): 2 x batch 2 == 1 x batch 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch("ldm", one, 1, config=write_config(tmp_path, "ldm", 4, 3))
    launch("ldm", two, 2, config=write_config(tmp_path, "ldm", 2, 3))
    for x, y in zip(log_of(one), log_of(two), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6), (x, y)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vae", "ldm"])
def test_tiny_configs_train_on_two_processes(tmp_path, kind):
    out = tmp_path / kind
    launch(kind, out, 2)
    assert [r["step"] for r in log_of(out)] == [1, 2]
    saved = out / ("model" if kind == "vae" else "pipeline")
    assert (saved / "model_index.json" if kind == "ldm" else saved / "config.json").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png"]


@pytest.mark.slow
def test_simclr_negatives_span_both_processes(tmp_path):
    """2 x 8 tiles: NT-Xent over 32 views; with near-identical projections at step 1 it is log(31), not log(15)."""
    import math

    out = tmp_path / "encoder"
    launch("encoder", out, 2, config=write_config(tmp_path, "encoder", 8, 1))
    assert log_of(out)[0]["loss"] == pytest.approx(math.log(31), abs=0.05)


@pytest.mark.slow
def test_stainfuser_histaug_and_translator_train_on_two_processes(tmp_path):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["stainfuser"]["options"]["vae"] = str(ROOT / "samples" / "checkpoints" / "vae_small")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    for kind in ("stainfuser", "histaug", "translator"):
        out = tmp_path / kind
        launch(kind, out, 2, config=config)
        assert [r["step"] for r in log_of(out)] == [1, 2], kind


@pytest.mark.slow
def test_controlnet_trains_on_two_processes(tmp_path):
    launch("ldm", tmp_path / "ldm", 1)
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["controlnet"]["options"]["pipeline"] = str(tmp_path / "ldm" / "pipeline")
    config = tmp_path / "controlnet.yaml"
    config.write_text(yaml.safe_dump({"controlnet": raw["controlnet"]}))
    out = tmp_path / "controlnet"
    launch("controlnet", out, 2, config=config)
    assert [r["step"] for r in log_of(out)] == [1, 2]
    assert (out / "pipeline" / "model_index.json").is_file()


def test_resume_with_another_number_of_processes_continues_the_run(tmp_path):
    """3 steps on 1 process = 2 steps on 1 process, then step 3 on 2 processes with half the batch."""
    whole = tmp_path / "whole"
    launch("vae", whole, 1, config=write_config(tmp_path, "vae", 4, 3))
    part = tmp_path / "part"
    config = write_config(tmp_path, "vae", 4, 3, checkpoint_every=1)
    launch("vae", part, 1, "--max-steps", "2", config=config)
    (tmp_path / "two").mkdir()
    launch("vae", part, 2, config=write_config(tmp_path / "two", "vae", 2, 3, checkpoint_every=1))
    a, b = log_of(whole), log_of(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], rel=1e-4)


def test_draws_do_not_depend_on_the_batch_split():
    from genpath.training.draws import StepDraws

    ids = torch.tensor([3, 1, 4, 1, 5])
    whole = StepDraws(7, 2, ids)
    halves = [StepDraws(7, 2, ids[:2]), StepDraws(7, 2, ids[2:])]
    assert torch.equal(whole.normal((3, 2)), torch.cat([h.normal((3, 2)) for h in halves]))
    assert torch.equal(whole.integers(1000), torch.cat([h.integers(1000) for h in halves]))
    x = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).view(5, 3, 4, 4)
    assert torch.equal(whole.flip(x), torch.cat([halves[0].flip(x[:2]), halves[1].flip(x[2:])]))
    assert not torch.equal(whole.normal((3,)), StepDraws(7, 3, ids).normal((3,)))  # another step: new draws
