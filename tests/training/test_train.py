import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from typer.testing import CliRunner

from genpath.cli import app
from genpath.encoders import SmallHistologyEncoder, create_encoder
from genpath.models.vae import build_vae, decode_tiled, encode_tiled
from genpath.training.configs import TrainConfig, load_train_config
from genpath.training.data import TileFolderDataset, ZarrTileDataset, in_holdout, write_tile_zarr
from genpath.training.encoder import nt_xent
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def run(kind, out, steps=2):
    return CliRunner().invoke(app, ["train", kind, "--config", str(TINY), "--output-dir", str(out),
                                    "--max-steps", str(steps)], catch_exceptions=False)


def test_train_encoder_two_steps_resume_and_load(tmp_path):
    result = run("encoder", tmp_path / "enc")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "enc" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    run("encoder", tmp_path / "enc", steps=3)  # resumes at step 2, trains one more
    log = [json.loads(line) for line in (tmp_path / "enc" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "enc" / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    enc = create_encoder("genpath-small", path=tmp_path / "enc" / "model")
    assert enc(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)).shape == (2, 16)


def test_train_vae_two_steps_writes_samples_and_round_trips(tmp_path):
    assert run("vae", tmp_path / "vae").exit_code == 0
    assert (tmp_path / "vae" / "samples" / "step-000002.png").is_file()
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "model")
    x = torch.rand(1, 3, 32, 32)
    assert decode_tiled(vae, encode_tiled(vae, x)).shape == (1, 3, 32, 32)


def test_bad_train_configs_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae:\n  data: {roots: [samples/tiles/pcam], size: 30}\n")
    result = CliRunner().invoke(app, ["train", "vae", "--config", str(bad)])
    assert result.exit_code != 0 and "data.size" in result.output
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"data": {"roots": ["x"]}, "extra": 1})
    with pytest.raises(ValueError, match="section"):
        load_train_config(str(TINY), "no_such_trainer")


def test_vae_tiled_coding_matches_untiled_and_checks_size():
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32).eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        full, tiled = encode_tiled(vae, x), encode_tiled(vae, x, tile=64)
        assert full.shape == tiled.shape == (1, 4, 48, 48)
        assert (full - tiled).abs().mean() < 0.5 * full.abs().mean()  # blended tiles, not identical
        assert decode_tiled(vae, full, tile=64).shape == (1, 3, 96, 96)
    with pytest.raises(ValueError, match="divisible by the VAE factor 2"):
        encode_tiled(vae, torch.rand(1, 3, 33, 32))


def test_nt_xent_prefers_matching_views():
    z = torch.randn(4, 8)
    matched = nt_xent(torch.cat([z, z]), 0.2)
    shuffled = nt_xent(torch.cat([z, z.roll(1, 0)]), 0.2)
    assert matched < shuffled


def test_datasets_holdout_and_zarr(tmp_path):
    root = ROOT / "samples" / "tiles" / "pcam"
    train = TileFolderDataset([root], 32, holdout=0.3)
    held = TileFolderDataset([root], 32, holdout=0.3, part="holdout")
    assert not set(train.files) & set(held.files) and len(train.files) + len(held.files) == 16
    assert all(in_holdout(f, 0.3) for f in held.files)
    assert train[0].shape == (3, 32, 32) and torch.equal(train[0], train[0])  # deterministic crops
    tiles = torch.stack([train[i] for i in range(4)])
    ds = ZarrTileDataset(write_tile_zarr(tiles, tmp_path / "tiles.zarr"))
    assert len(ds) == 4 and torch.equal(ds[2], tiles[2])
    with pytest.raises(ValueError, match="at least 200px"):
        TileFolderDataset([root], 200)


def test_small_encoder_save_pretrained_round_trip(tmp_path):
    model = SmallHistologyEncoder(widths=(8, 16), embed_dim=8, stem_stride=2)
    model.save_pretrained(tmp_path / "m")
    again = SmallHistologyEncoder.from_pretrained(tmp_path / "m")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), again.eval()(x))


def test_train_ldm_two_steps_gives_a_working_pipeline(tmp_path):
    from genpath.pipelines import EmbeddingToImagePipeline

    assert run("vae", tmp_path / "vae").exit_code == 0
    assert run("encoder", tmp_path / "enc").exit_code == 0
    config = tmp_path / "ldm.yaml"
    config.write_text(f"""
ldm:
  data: {{roots: [{ROOT / 'samples' / 'tiles' / 'pcam'}], size: 32}}
  train: {{output_dir: {tmp_path / 'ldm'}, max_steps: 2, batch_size: 4, checkpoint_every: 1, sample_every: 2}}
  model:
    block_out_channels: [16, 32]
    down_block_types: [CrossAttnDownBlock2D, DownBlock2D]
    up_block_types: [UpBlock2D, CrossAttnUpBlock2D]
    cross_attention_dim: 16
    attention_head_dim: 4
    norm_num_groups: 8
  options:
    vae: {tmp_path / 'vae' / 'model'}
    encoder: genpath-small
    encoder_kwargs: {{path: {tmp_path / 'enc' / 'model'}}}
    num_tokens: 2
    projector_hidden: 32
""")
    result = CliRunner().invoke(app, ["train", "ldm", "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ldm" / "samples" / "step-000002.png").is_file()
    pipe = EmbeddingToImagePipeline.from_pretrained(tmp_path / "ldm" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.randn(1, 16), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)


def test_fp16_export_loads_back_as_float32(tmp_path):
    from genpath.training.export import export_fp16

    model = SmallHistologyEncoder(widths=(8, 16), embed_dim=8)
    model.save_pretrained(tmp_path / "m")
    export_fp16(SmallHistologyEncoder, tmp_path / "m", tmp_path / "half")
    enc = create_encoder("genpath-small", path=tmp_path / "half")
    assert next(enc.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), create_encoder("genpath-small", model=model)(x), atol=2e-2, rtol=2e-2)


TRAIN_SECTIONS = {"encoder", "vae", "ldm", "histaug", "stainfuser", "controlnet", "translator"}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_parses(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    for section in sorted(set(raw) & TRAIN_SECTIONS):
        config = load_train_config(str(path), section)
        assert config.train.max_steps >= 1 and config.data.size > 0
