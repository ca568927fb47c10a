"""The diffusion stain normalizer: pipeline contract, normalizer interface, bad input, training smoke run."""

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

from genpath.models.style import StyleTokenizer, latent_cells
from genpath.models.vae import build_vae
from genpath.pipelines import StainFuserNormalizer
from genpath.pipelines.stain_transfer import (
    StainTransferPipeline,
    StainTransferPipelineOutput,
    stain_transfer_scheduler,
    tissue_weights,
)
from normalization import StainNormalizer, build_normalizer
from normalization.functional import REFERENCE_STAINS, od_to_rgb, render_od
from tests.conftest import ROOT

TINY_UNET = {
    "block_out_channels": (16, 32),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}


def tiny_pipeline(in_channels: int = 8) -> StainTransferPipeline:
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(**TINY_UNET, sample_size=16, in_channels=in_channels, out_channels=4)
    tok = StyleTokenizer(latent_channels=4, cross_attention_dim=16, hidden_dim=16, max_tokens=32)
    return StainTransferPipeline(vae=vae, unet=unet, style_tokenizer=tok, scheduler=stain_transfer_scheduler())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("stainfuser") / "pipe"
    tiny_pipeline().save_pretrained(path)
    return path


def he_tiles(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """H&E tiles rendered by Beer–Lambert from the reference stains (known physics, all tissue)."""
    g = torch.Generator().manual_seed(seed)
    conc = torch.rand(n, 2, size, size, generator=g) * torch.tensor([1.2, 0.8])[:, None, None] + 0.15
    return od_to_rgb(render_od(conc, REFERENCE_STAINS))


def test_style_tokenizer_keeps_tissue_cells_and_ignores_order():
    tok = StyleTokenizer(latent_channels=4, cross_attention_dim=8, hidden_dim=8, max_tokens=4).eval()
    cells, weights = torch.randn(1, 10, 4), torch.zeros(1, 10)
    weights[0, [2, 5, 7, 9]] = 1.0
    kept, kept_w = tok.select(cells, weights)
    assert kept_w.eq(1).all() and set(map(tuple, kept[0].tolist())) == set(map(tuple, cells[0, [2, 5, 7, 9]].tolist()))
    perm = torch.randperm(10)
    a, b = tok(cells, weights), tok(cells[:, perm], weights[:, perm])
    torch.testing.assert_close(a[:, 0], b[:, 0])  # pooled token: order-free
    torch.testing.assert_close(a[:, 1:].sort(1).values, b[:, 1:].sort(1).values)
    with pytest.raises(ValueError, match="cells"):
        tok(torch.randn(1, 10, 3), torch.ones(1, 10))


def test_tissue_weights_and_cells_shapes():
    rgb = torch.ones(2, 3, 16, 16)
    rgb[:, :, :8] = he_tiles(2, 16)[:, :, :8]
    w = tissue_weights(rgb, 4)
    assert w.shape == (2, 1, 4, 4) and w[:, :, :2].min() > 0.9 and w[:, :, 2:].max() == 0
    cells, weights = latent_cells(torch.randn(2, 4, 4, 4), w)
    assert cells.shape == (2, 16, 4) and weights.shape == (2, 16)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pipeline_round_trip_determinism_and_batch_invariance(model_dir):
    pipe = StainTransferPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    src, ref = he_tiles(8, seed=1), he_tiles(1, seed=2)
    tokens = pipe.encode_style(ref)
    assert tokens.shape == (1, 1 + 32, 16)
    full = pipe(src, style_tokens=tokens, num_inference_steps=2, generator=gen(3)).images
    again = tiny_pipeline()(src, reference=ref, num_inference_steps=2, generator=gen(3)).images
    torch.testing.assert_close(full, again)  # saved == in-memory, tokens cached == encoded on the fly
    singles = torch.cat([pipe(src[i : i + 1], style_tokens=tokens, num_inference_steps=2, generator=gen(3)).images
                         for i in range(8)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=0)
    other_seed = pipe(src, style_tokens=tokens, num_inference_steps=2, generator=gen(4)).images
    assert not torch.allclose(full, other_seed)
    assert full.shape == src.shape and 0 <= full.min() and full.max() <= 1


def test_pipeline_output_generator_default_and_return_dict(model_dir):
    pipe = StainTransferPipeline.from_pretrained(model_dir)
    src, tokens = he_tiles(2, seed=1), pipe.encode_style(he_tiles(1, seed=2))
    out = pipe(src, style_tokens=tokens, num_inference_steps=1)
    assert isinstance(out, StainTransferPipelineOutput) and torch.equal(out.style_tokens, tokens)
    torch.testing.assert_close(out.images, pipe(src, style_tokens=tokens, num_inference_steps=1,
                                                 generator=gen(0)).images)  # default: seed 0, deterministic
    images, used = pipe(src, style_tokens=tokens, num_inference_steps=1, return_dict=False)
    assert torch.equal(images, out.images) and torch.equal(used, tokens)
    by_reference = pipe(src, reference=he_tiles(1, seed=2), num_inference_steps=1)
    torch.testing.assert_close(by_reference.style_tokens, tokens)
    per_tile = pipe(src, style_tokens=tokens, num_inference_steps=1, generator=[gen(0), gen(9)]).images
    torch.testing.assert_close(per_tile[:1], out.images[:1])  # a list: each tile its own draw
    with pytest.raises(ValueError, match="generator: expected one generator per image"):
        pipe(src, style_tokens=tokens, generator=[gen(0)])


def test_pipeline_checks_inputs_before_compute(model_dir):
    pipe = StainTransferPipeline.from_pretrained(model_dir)
    tokens = pipe.encode_style(he_tiles(1))
    with pytest.raises(ValueError, match="images: expected height and width divisible"):
        pipe(torch.rand(1, 3, 31, 32), style_tokens=tokens)
    with pytest.raises(ValueError, match="style_tokens"):
        pipe(he_tiles(1), style_tokens=torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="style_tokens"):
        pipe(he_tiles(1), style_tokens=tokens * float("nan"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(he_tiles(1), style_tokens=tokens, num_inference_steps=0)


def test_mismatched_checkpoint_is_named(tmp_path):
    tiny_pipeline(in_channels=4).save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="unet: expected in/out channels 8/4"):
        StainFuserNormalizer(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="model"):
        StainFuserNormalizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="model"):
        build_normalizer("stainfuser")


def test_registry_finds_the_plugin_without_normalization_importing_pipelines(model_dir):
    import subprocess
    import sys

    code = ("import sys, normalization; assert 'genpath.pipelines' not in sys.modules; "
            "assert 'stainfuser' in normalization.available_methods(); assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    norm = build_normalizer("stainfuser", model=model_dir, num_inference_steps=1)
    assert type(norm) is StainFuserNormalizer and norm.method == "stainfuser"


def test_normalizer_interface_white_tiles_state_round_trip(model_dir, tmp_path):
    norm = StainFuserNormalizer(model_dir, num_inference_steps=1)
    with pytest.raises(RuntimeError, match="fit"):
        norm(he_tiles(1))
    background = torch.full((1, 3, 64, 64), 0.97)
    background[..., :16, :16] = he_tiles(1, 16)  # 6% tissue
    with pytest.raises(ValueError, match="target_images: expected at least 10% tissue"):
        norm.fit(background)
    assert norm.fit(he_tiles(2, seed=5)) is norm
    tiles = (torch.cat([he_tiles(3, seed=6), torch.ones(1, 3, 32, 32)]) * 255).round().to(torch.uint8)
    before = tiles.clone()
    out, valid = norm(tiles, return_valid=True)
    assert torch.equal(tiles, before), "input changed in place"
    assert out.dtype == torch.uint8 and out.shape == tiles.shape
    assert valid.tolist() == [True, True, True, False]
    assert torch.equal(out[3], tiles[3])  # a white tile stays white: never sent to the model
    one = norm(tiles[0])
    assert one.shape == (3, 32, 32) and torch.equal(one, out[0])
    norm.save(tmp_path / "state.safetensors")
    loaded = StainNormalizer.load(tmp_path / "state.safetensors")
    assert isinstance(loaded, StainFuserNormalizer) and loaded.num_inference_steps == 1
    assert torch.equal(loaded(tiles), out)


def write_pairs(folder):
    """A CSV of registered pairs (source tile, its darkened copy) from 2 slides."""
    from genpath.io.images import read_image, write_image

    folder.mkdir()
    rows = ["name,slide,src,tgt"]
    for i, path in enumerate(sorted((ROOT / "samples" / "tiles" / "pcam").glob("*.jpg"))[:6]):
        image = read_image(path)
        write_image(image, folder / f"a{i}.png")
        write_image((image.float() * 0.8).to(torch.uint8), folder / f"h{i}.png")
        rows.append(f"p{i},s{i % 3},a{i}.png,h{i}.png")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_paired_dataset_crops_pairs_alike_and_splits_by_slide(tmp_path):
    from genpath.training.data import PairedTileDataset

    data = PairedTileDataset(write_pairs(tmp_path / "p"), 32, "src", "tgt", "slide", groups=["s0", "s1"])
    assert len(data) == 4 * 4 and {g for _, _, g in data.pairs} == {"s0", "s1"}
    for item in range(len(data)):
        source, target, reference = data[item]
        assert source.shape == target.shape == reference.shape == (3, 32, 32)
        assert (target.int() - (source.float() * 0.8).to(torch.uint8).int()).abs().max() <= 12  # same window
    with pytest.raises(ValueError, match="groups"):
        PairedTileDataset(tmp_path / "p" / "pairs.csv", 32, "src", "tgt", "slide", groups=["nope"])
    with pytest.raises(ValueError, match="'aperio' column"):
        PairedTileDataset(tmp_path / "p" / "pairs.csv", 32)


def test_train_stainfuser_tiny_config_and_cli_normalize(tmp_path):
    from genpath.cli import app

    tiny = ROOT / "configs" / "tiny.yaml"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "vae", "--config", str(tiny), "--output-dir", str(tmp_path / "vae")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    section = yaml.safe_load(tiny.read_text())["stainfuser"]
    section["options"]["vae"] = str(tmp_path / "vae" / "model")
    section["data"]["roots"] = [str(ROOT / "samples" / "tiles" / "pcam")]
    section["train"]["output_dir"] = str(tmp_path / "sf")
    section["options"]["pairs"] = {"csv": str(write_pairs(tmp_path / "pairs")), "groups": ["s1", "s2"], "share": 0.5,
                                    "source_column": "src", "target_column": "tgt"}
    (tmp_path / "sf.yaml").write_text(yaml.safe_dump({"stainfuser": section}))
    result = runner.invoke(app, ["train", "stainfuser", "--config", str(tmp_path / "sf.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "sf" / "samples" / "step-000002.png").is_file()
    tiles = ROOT / "samples" / "tiles" / "pcam"
    result = runner.invoke(app, ["normalize", str(tiles / "label0_patch0000000.jpg"),
                                 str(tiles / "label1_patch0000001.jpg"),
                                 "--method", "stainfuser", "--model", str(tmp_path / "sf" / "pipeline"),
                                 "--target", str(tiles / "label1_patch0000003.jpg"), "--out", str(tmp_path / "norm")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "norm").glob("*.png")) == [
        "label0_patch0000000.png", "label1_patch0000001.png"]


def test_whole_slide_through_overlapping_windows(model_dir, tmp_path, patches):
    from genpath.io.slide import open_slide
    from genpath.io.synthetic_slide import write_synthetic_slide
    from normalization.slide import SlideOptions, normalize_slide

    path = write_synthetic_slide(tmp_path / "in.tif", 256, 192, patches, kind="tiff", tile=128, mpp=0.5, seed=1)
    norm = StainFuserNormalizer(model_dir, num_inference_steps=1).fit(he_tiles(1, 64))
    options = SlideOptions(tile_size=64, overlap=16, output_format="ome-zarr", qc=False, min_tissue=0.0)
    result = normalize_slide(path, tmp_path / "out.ome.zarr", norm, options)
    assert result.tiles == 12
    with open_slide(path) as src, open_slide(tmp_path / "out.ome.zarr") as out:
        assert out.dimensions == src.dimensions
        a, b = src.read_region((0, 0), 0, (256, 192)), out.read_region((0, 0), 0, (256, 192))
    # a tile's interior (farther than `overlap` from its border) comes from its own window alone
    window = torch.from_numpy(a[48:144, 48:144]).permute(2, 0, 1).contiguous()
    expected = norm(window).permute(1, 2, 0).numpy()
    assert np.abs(b[80:112, 80:112].astype(int) - expected[32:64, 32:64]).max() <= 1
    assert np.abs(b.astype(int) - a).mean() > 0.5  # the model did change the slide
