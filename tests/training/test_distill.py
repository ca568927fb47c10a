"""One-step distillation of the stain normalizer: sampler parity, training, resume, config errors, shipped model."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

from genpath.cli import app
from genpath.models.style import StyleTokenizer
from genpath.models.vae import build_vae, encode_tiled
from genpath.pipelines.noise import shared_noise
from genpath.pipelines.stain_transfer import StainTransferPipeline, stain_transfer_scheduler
from genpath.training.configs import load_train_config
from genpath.training.distill import DEFAULT_STEPS_KEY, ddim_latents, export_student, one_step_timestep
from normalization.restain import RestainingSimulator
from tests.conftest import ROOT
from tests.normalization.test_stainfuser import TINY_UNET


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random StainTransferPipeline (VAE factor 2) saved as a folder."""
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(**TINY_UNET, sample_size=16, in_channels=8, out_channels=4)
    tok = StyleTokenizer(latent_channels=4, cross_attention_dim=16, hidden_dim=16, max_tokens=32)
    path = tmp_path_factory.mktemp("distill") / "teacher"
    StainTransferPipeline(vae=vae, unet=unet, style_tokenizer=tok, scheduler=stain_transfer_scheduler()) \
        .save_pretrained(path)
    return path


def write_config(path, teacher, out, **options):
    config = {"stainfuser-distill": {
        "data": {"roots": [str(ROOT / "samples" / "tiles" / "pcam")], "size": 32, "crops_per_image": 4},
        "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3,
                  "checkpoint_every": 2, "log_every": 1, "sample_every": 100},
        "options": {"teacher": str(teacher), "teacher_steps": 4, **options}}}
    path.write_text(yaml.safe_dump(config))
    return path


def train(config, steps):
    return CliRunner().invoke(app, ["train", "stainfuser-distill", "--config", str(config), "--max-steps", str(steps)],
                              catch_exceptions=False)


def triplets(n=8, seed=1):
    """Fixed evaluation triplets from the sample tiles (centre crops, 32 px)."""
    from genpath.training.data import TileFolderDataset

    data = TileFolderDataset([ROOT / "samples" / "tiles" / "pcam"], 32, 1, seed)
    tiles = torch.stack([data[i] for i in range(n)]).float() / 255
    return RestainingSimulator()(tiles, generator=torch.Generator().manual_seed(seed))


def gap_to_teacher(student_dir, teacher_dir, tri, steps=4):
    """Latent MSE between the student's one-step output and the teacher's ``steps``-step output."""
    teacher = StainTransferPipeline.from_pretrained(teacher_dir)
    student = StainTransferPipeline.from_pretrained(student_dir)
    gaps = []
    for i in range(len(tri.source)):
        tokens = teacher.encode_style(tri.reference[i : i + 1])
        goal = teacher(tri.source[i : i + 1], style_tokens=tokens, num_inference_steps=steps, output_type="latent")
        one = student(tri.source[i : i + 1], style_tokens=tokens, num_inference_steps=1, output_type="latent")
        gaps.append(torch.mean((one.images - goal.images) ** 2).item())
    return float(np.mean(gaps))


def test_teacher_targets_are_the_pipelines_own_latents(teacher_dir):
    pipe = StainTransferPipeline.from_pretrained(teacher_dir)
    tri = triplets(2)
    tokens = pipe.encode_style(tri.reference[:1])
    out = pipe(tri.source, style_tokens=tokens, num_inference_steps=3, output_type="latent").images
    source = encode_tiled(pipe.vae, tri.source)
    noise = shared_noise(tuple(source.shape), torch.Generator().manual_seed(0), source.device, source.dtype)
    ours = ddim_latents(pipe.unet, pipe.scheduler, noise, source, tokens.expand(2, -1, -1), 3)
    torch.testing.assert_close(ours, out, atol=1e-5, rtol=1e-5)
    assert one_step_timestep(pipe.scheduler) == 999  # trailing spacing: the one step starts at T - 1


def test_distillation_moves_the_student_to_the_teacher_and_resumes(teacher_dir, tmp_path):
    out = tmp_path / "student"
    config = write_config(tmp_path / "distill.yaml", teacher_dir, out, cache_samples=48)
    raw = yaml.safe_load(config.read_text())
    raw["stainfuser-distill"]["train"]["learning_rate"] = 3e-4
    config.write_text(yaml.safe_dump(raw))
    tri = triplets()  # other tiles and styles than the cached training targets
    before = gap_to_teacher(teacher_dir, teacher_dir, tri)  # the student starts as the teacher
    assert train(config, 40).exit_code == 0
    assert len(list((out / "targets").glob("chunk-*.safetensors"))) == 12  # 48 targets in chunks of 4
    after = gap_to_teacher(out / "pipeline", teacher_dir, tri)
    assert after < 0.85 * before, (before, after)  # seeded: 0.0297 -> 0.0219
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StainTransferPipeline" and index[DEFAULT_STEPS_KEY] == 1
    # resume: continues from the step-40 checkpoint, logs only the new steps
    assert train(config, 42).exit_code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 43)) and all(np.isfinite(r["distill_mse"]) for r in log)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000040", "step-000042"]
    # fp16 export for samples/checkpoints keeps the one-step marker and loads like the teacher
    shipped = export_student(out / "pipeline", tmp_path / "shipped")
    assert json.loads((shipped / "model_index.json").read_text())[DEFAULT_STEPS_KEY] == 1
    from safetensors.torch import load_file

    weights = load_file(shipped / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.float16 for w in weights.values())
    assert gap_to_teacher(shipped, teacher_dir, tri) == pytest.approx(gap_to_teacher(out / "pipeline", teacher_dir,
                                                                                     tri), rel=0.1, abs=1e-4)


def test_online_distillation_with_ground_truth_term(teacher_dir, tmp_path):
    out = tmp_path / "online"
    config = write_config(tmp_path / "online.yaml", teacher_dir, out, target_weight=0.5)
    assert train(config, 2).exit_code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:  # loss = distillation + 0.5 x ground truth, both logged
        assert r["loss"] == pytest.approx(r["distill_mse"] + 0.5 * r["target_mse"], rel=1e-5)
    assert not (out / "targets").exists()


def test_distill_config_errors_name_the_key(teacher_dir, tmp_path):
    typo = write_config(tmp_path / "typo.yaml", teacher_dir, tmp_path / "o", teacher_step=4)
    with pytest.raises(ValueError, match=r"teacher_step"):
        load_train_config(str(typo), "stainfuser-distill")
    bad = write_config(tmp_path / "bad.yaml", teacher_dir, tmp_path / "o", target_weight=-1.0)
    with pytest.raises(ValueError, match=r"options.target_weight"):
        load_train_config(str(bad), "stainfuser-distill")
    both = write_config(tmp_path / "both.yaml", teacher_dir, tmp_path / "o", target_weight=0.5, cache_samples=8)
    with pytest.raises(ValueError, match=r"options.target_weight: expected 0 with cache_samples"):
        from genpath.training.run import run_training

        run_training("stainfuser-distill", both)
    raw = yaml.safe_load(typo.read_text())
    raw["stainfuser-distill"]["options"] = {"teacher_steps": 4}
    raw["stainfuser-distill"]["model"] = {"block_out_channels": [8, 8]}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"model: expected no 'model' block"):
        load_train_config(str(tmp_path / "model.yaml"), "stainfuser-distill")
    del raw["stainfuser-distill"]["model"]
    (tmp_path / "none.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"options.teacher: expected a StainTransferPipeline folder"):
        run_training("stainfuser-distill", tmp_path / "none.yaml")


def test_shipped_distill_config_parses():
    config = load_train_config(str(ROOT / "configs" / "stainfuser_1step.yaml"), "stainfuser-distill")
    assert config.options["teacher"] == "samples/checkpoints/stainfuser_small"
    assert config.options["teacher_steps"] == 20 and config.data.holdout == 0.3
    assert config.options["cache_samples"] > 0 and config.options["target_weight"] == 0.0


def test_shipped_one_step_checkpoint_loads_and_normalizes():
    from genpath.pipelines import StainFuserNormalizer

    folder = ROOT / "samples" / "checkpoints" / "stainfuser_1step"
    assert json.loads((folder / "model_index.json").read_text())[DEFAULT_STEPS_KEY] == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the index's extra key and the fp16 weights load without a warning
        pipe = StainTransferPipeline.from_pretrained(folder)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    teacher = StainTransferPipeline.from_pretrained(ROOT / "samples" / "checkpoints" / "stainfuser_small")
    def architecture(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert architecture(pipe.unet.config) == architecture(teacher.unet.config)  # a drop-in replacement
    tri = triplets(2)
    norm = StainFuserNormalizer(folder, num_inference_steps=1, min_target_tissue=0.0).fit(tri.reference[:1])
    out = norm((tri.source * 255).round().to(torch.uint8))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8


def test_normalizer_defaults_to_the_folders_one_step():
    import genpath.pipelines.stainfuser_normalizer as module

    if not hasattr(module, "folder_default_steps"):
        pytest.skip("the stain normalizer does not read model_index.json's _default_inference_steps yet")
    folder = ROOT / "samples" / "checkpoints"
    assert module.StainFuserNormalizer(folder / "stainfuser_1step").num_inference_steps == 1
    assert module.StainFuserNormalizer(folder / "stainfuser_small").num_inference_steps == 4
