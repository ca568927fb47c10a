"""What the shared training loop adds to every trainer: EMA, LR schedule, accumulation, checkpointing, trackers.

Known answers: the EMA of the raw weights written at each step (diffusers' decay formula), the
linear warm-up/decay rates, and exact equivalences (accumulation, gradient checkpointing).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genpath.training.run import run_training
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def vae_config(tmp_path, name="vae.yaml", **train):
    raw = yaml.safe_load(TINY.read_text())["vae"]
    raw["train"].update({"sample_every": 1000, **train})
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"vae": raw}))
    return path


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_ema_weights_are_exported_and_follow_the_published_decay(tmp_path):
    out = tmp_path / "ema"
    config = vae_config(tmp_path, ema=True, ema_decay=0.99, keep_checkpoints=3, checkpoint_every=1)
    run_training("vae", config, max_steps=3, output_dir=out)
    raw = [load_file(out / "checkpoints" / f"step-00000{s}" / "model" / WEIGHTS) for s in (1, 2, 3)]
    exported = load_file(out / "model" / WEIGHTS)

    def decay(optimization_step):  # diffusers EMAModel.get_decay with use_ema_warmup, power 2/3
        step = optimization_step - 1
        return 0.0 if step <= 0 else min(0.99, 1 - (1 + step) ** (-2 / 3))

    for key in ("encoder.conv_in.weight", "decoder.conv_out.bias"):
        shadow = raw[0][key]  # the first update has decay 0: the shadow becomes the step-1 weights
        for n in (2, 3):
            shadow = decay(n) * shadow + (1 - decay(n)) * raw[n - 1][key]
        torch.testing.assert_close(exported[key], shadow, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(exported[key], raw[2][key])  # not simply the last weights


def test_linear_schedule_with_warmup_logs_the_rate_each_step_used(tmp_path):
    out = tmp_path / "lr"
    config = vae_config(tmp_path, lr_scheduler="linear", lr_warmup_steps=2, learning_rate=1e-3)
    run_training("vae", config, max_steps=4, output_dir=out)
    rates = [r["lr"] for r in log_of(out)]
    assert rates == pytest.approx([0.0, 0.5e-3, 1e-3, 0.5e-3])
    assert all(r["samples_per_s"] > 0 for r in log_of(out))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_training("vae", vae_config(tmp_path, "a.yaml", batch_size=4), max_steps=2, output_dir=whole)
    run_training("vae", vae_config(tmp_path, "b.yaml", batch_size=2, gradient_accumulation_steps=2),
                 max_steps=2, output_dir=split)
    for x, y in zip(log_of(whole), log_of(split), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    a, b = load_file(whole / "model" / WEIGHTS), load_file(split / "model" / WEIGHTS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_gradient_checkpointing_and_clipping_keep_the_loss_curve(tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    run_training("vae", vae_config(tmp_path, "a.yaml"), max_steps=2, output_dir=plain)
    run_training("vae", vae_config(tmp_path, "b.yaml", gradient_checkpointing=True, max_grad_norm=1e6),
                 max_steps=2, output_dir=checkpointed)
    for x, y in zip(log_of(plain), log_of(checkpointed), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


def test_tiny_clipping_changes_the_update(tmp_path):
    free, clipped = tmp_path / "free", tmp_path / "clipped"
    run_training("vae", vae_config(tmp_path, "a.yaml", learning_rate=0.1), max_steps=2, output_dir=free)
    run_training("vae", vae_config(tmp_path, "b.yaml", learning_rate=0.1, max_grad_norm=1e-8), max_steps=2,
                 output_dir=clipped)
    assert log_of(free)[0]["loss"] == pytest.approx(log_of(clipped)[0]["loss"])  # same start
    assert log_of(free)[1]["loss"] != pytest.approx(log_of(clipped)[1]["loss"], rel=1e-6)


def test_interrupted_log_lines_are_not_repeated_on_resume(tmp_path):
    out = tmp_path / "run"
    config = vae_config(tmp_path, checkpoint_every=2)
    run_training("vae", config, max_steps=2, output_dir=out)
    with open(out / "log.jsonl", "a") as log:  # a step logged by a run that died before its checkpoint
        log.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')  # and a line cut short
    run_training("vae", config, max_steps=4, output_dir=out)
    assert [r["step"] for r in log_of(out)] == [1, 2, 3, 4]
    assert log_of(out)[2]["loss"] != 9.0


def test_tensorboard_tracker_records_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run_training("vae", vae_config(tmp_path, log_with=["tensorboard"]), max_steps=2, output_dir=out)
    assert list(out.rglob("events.out.tfevents.*"))


def test_progress_is_logged_with_loss_rate_and_eta_off_a_terminal(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="genpath"):
        run_training("vae", vae_config(tmp_path), max_steps=2, output_dir=tmp_path / "p")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2 and "samples/s" in lines[-1] and "ETA" in lines[-1]


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    run_training("vae", vae_config(tmp_path, mixed_precision="bf16"), max_steps=1, output_dir=out)
    assert load_file(out / "model" / WEIGHTS)["decoder.conv_out.bias"].dtype == torch.float32


@pytest.mark.parametrize(("train", "message"), [
    ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler: expected one of"),
    ({"log_with": ["tensorbored"]}, "log_with: expected trackers"),
    ({"ema_decay": 1.5}, "ema_decay: expected a number in [0, 1)"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm: expected finite"),
    ({"max_grad_norm": -1.0}, "max_grad_norm: expected a finite number > 0"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps: expected a positive integer"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps: expected >= 1 / >= 0 / >= 0"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing: expected"),
])
def test_bad_loop_settings_are_one_line_errors(tmp_path, train, message):
    with pytest.raises(ValueError) as error:
        run_training("vae", vae_config(tmp_path, **train), max_steps=1, output_dir=tmp_path / "x")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_gradient_checkpointing_on_a_model_without_it_is_named(tmp_path):
    raw = yaml.safe_load(TINY.read_text())["encoder"]
    raw["train"]["gradient_checkpointing"] = True
    config = tmp_path / "enc.yaml"
    config.write_text(yaml.safe_dump({"encoder": raw}))
    with pytest.raises(ValueError, match="gradient_checkpointing: expected a model that supports it"):
        run_training("encoder", config, max_steps=1, output_dir=tmp_path / "enc")


def test_checkpoints_of_the_earlier_format_are_named_not_silently_restarted(tmp_path):
    out = tmp_path / "old"
    old = out / "checkpoints" / "step-000100"
    (old / "model").mkdir(parents=True)
    (old / "optimizer.bin").write_bytes(b"accelerate save_state")  # no state.json: the earlier format
    with pytest.raises(ValueError, match="earlier accelerate format"):
        run_training("vae", vae_config(tmp_path), max_steps=1, output_dir=out)
    assert (old / "optimizer.bin").is_file()
