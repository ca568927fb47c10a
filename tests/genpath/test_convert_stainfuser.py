"""genpath convert stainfuser: the published StainFuser checkpoint -> genpath normalize --method stainfuser.

The reference below is a transcription of the published code (R-J96/stainFuser ``src/models/arch.py``:
``OveriddenControlNet``, ``OveriddenUnet2D``, ``StainFuserArchitecture``; ``src/misc/model_utils.py``
``load_stainFuser``; ``src/recipe.py`` ``StainFuserEngine.denoising_inference``), independent of genpath's
converter and pipeline: the same classes, config keys (the SD-2.1-base JSONs with widths shrunk), key
prefixes and file formats (flat ``.safetensors``; ``.pth`` with DataParallel's ``module.``), tiny widths. Its
denoising loop runs with fixed noise and is compared with genpath's output.
"""

import json
import os
import pickle
import tomllib

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from genpath.cli import app
from genpath.pipelines import StainFuserNormalizer, StainFuserPipeline, StainFuserPipelineOutput
from genpath.pipelines.convert_stainfuser import CONFIG_DIR, expected_checkpoint_shapes, stainfuser_configs
from genpath.pipelines.stain_transfer import StainTransferPipeline
from normalization import StainNormalizer
from tests.conftest import ROOT, SAMPLES

runner = CliRunner()
SHIPPED = {n: json.loads((CONFIG_DIR / f"{n}.json").read_text()) for n in ("unet", "vae", "scheduler")}
# the published SD-2.1-base configs with the widths shrunk (same keys, same block types per level)
TINY_UNET = {**SHIPPED["unet"], "block_out_channels": [8, 16], "attention_head_dim": [2, 2], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "cross_attention_dim": 8,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 4, "sample_size": 8}
TINY_VAE = {**SHIPPED["vae"], "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1, "norm_num_groups": 4,
            "sample_size": 32}


# reference: a transcription of the published arch.py / model_utils.py / recipe.py --------------------

class OveriddenControlNet(ControlNetModel):
    def __init__(self, pretrained_unet, controlnet_conditioning_channel_order="rgb",
                 conditioning_embedding_out_channels=(16, 32, 96, 256), conditioning_embedding_in_channels=3,
                 cross_attention_dim=1024):
        cfg = pretrained_unet.config
        super().__init__(
            in_channels=cfg.in_channels, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
            down_block_types=cfg.down_block_types, only_cross_attention=cfg.only_cross_attention,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            downsample_padding=cfg.downsample_padding, mid_block_scale_factor=cfg.mid_block_scale_factor,
            act_fn=cfg.act_fn, norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
            cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=cfg.attention_head_dim,
            use_linear_projection=cfg.use_linear_projection, class_embed_type=cfg.class_embed_type,
            num_class_embeds=cfg.num_class_embeds, upcast_attention=cfg.upcast_attention,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim,
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        self.conv_in.load_state_dict(pretrained_unet.conv_in.state_dict())
        self.time_proj.load_state_dict(pretrained_unet.time_proj.state_dict())
        self.time_embedding.load_state_dict(pretrained_unet.time_embedding.state_dict())
        self.down_blocks.load_state_dict(pretrained_unet.down_blocks.state_dict())
        self.mid_block.load_state_dict(pretrained_unet.mid_block.state_dict())
        self.encoder_projector = None
        if cross_attention_dim != cfg.cross_attention_dim:
            self.encoder_projector = nn.Linear(cross_attention_dim, cfg.cross_attention_dim)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                return_dict=True):
        if self.encoder_projector:
            encoder_hidden_states = self.encoder_projector(encoder_hidden_states)
        return super().forward(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                               return_dict=return_dict)


class OveriddenUnet2D(UNet2DConditionModel):
    def __init__(self, pretrained_unet, encoder_hid_dim):
        super().__init__(**pretrained_unet.config)
        self.load_state_dict(pretrained_unet.state_dict())
        self.encoder_projector = None
        if encoder_hid_dim and encoder_hid_dim != self.config.cross_attention_dim:
            self.encoder_projector = nn.Linear(encoder_hid_dim, self.config.cross_attention_dim)

    def forward(self, sample, timestep, encoder_hidden_states, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        if self.encoder_projector:
            encoder_hidden_states = self.encoder_projector(encoder_hidden_states)
        output = super().forward(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                 down_block_additional_residuals=down_block_additional_residuals,
                                 mid_block_additional_residual=mid_block_additional_residual)
        return output.sample


class StainFuserArchitecture(nn.Module):
    def __init__(self, conditioner, encoder, noise_scheduler, noise_predictor):
        super().__init__()
        self.encoder = encoder
        self.conditioner = conditioner
        self.noise_scheduler = noise_scheduler
        self.noise_predictor = noise_predictor


def private(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_stainfuser(seed=0):
    """load_stainFuser(pretrained=None) with the tiny configs, then every weight made random (zero convs too)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**private(TINY_UNET))
    noise_predictor = OveriddenUnet2D(unet, encoder_hid_dim=4)
    controlnet = OveriddenControlNet(unet, cross_attention_dim=4, conditioning_embedding_in_channels=4)
    arch = StainFuserArchitecture(encoder=AutoencoderKL(**private(TINY_VAE)), conditioner=controlnet,
                                  noise_predictor=noise_predictor,
                                  noise_scheduler=PNDMScheduler(**private(SHIPPED["scheduler"])))
    with torch.no_grad():
        for p in arch.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return arch.eval()


@torch.no_grad()
def reference_restain(arch, source, target, noise, target_generator, steps=20):
    """StainFuserEngine.denoising_inference with the target sample and the initial noise given (batch of 1)."""
    noise_scheduler = arch.noise_scheduler
    noise_scheduler.set_timesteps(steps, device="cpu")
    latents = arch.encoder.encode(target).latent_dist.sample(target_generator)  # prepare_latent
    tgt_latents = latents * arch.encoder.config.scaling_factor
    batch_size, latent_channels = tgt_latents.shape[:2]
    tgt_latents = tgt_latents.reshape(batch_size, latent_channels, -1).permute(0, 2, 1)
    noise_latents = noise * noise_scheduler.init_noise_sigma
    for t in noise_scheduler.timesteps:
        latent_model_input = noise_scheduler.scale_model_input(noise_latents, t)
        down, mid = arch.conditioner(latent_model_input, t, encoder_hidden_states=tgt_latents,
                                     controlnet_cond=source, return_dict=False)
        noise_pred = arch.noise_predictor(latent_model_input, t, encoder_hidden_states=tgt_latents,
                                          down_block_additional_residuals=down, mid_block_additional_residual=mid)
        noise_latents = noise_scheduler.step(noise_pred, t, noise_latents, return_dict=False)[0]
    output = arch.encoder.decode(noise_latents / arch.encoder.config.scaling_factor).sample
    return ((output.clamp(-1, 1) + 1.0) / 2.0), tgt_latents  # inverse_transform(is_tsf=True), before * 255


def gen(seed):
    return torch.Generator().manual_seed(seed)


def crops(patches, n, size=32, start=0):
    """Real H&E crops (CRC-VAL-HE-7K, tissue classes: patch 0, adipose, is mostly white) as float (n,3,size,size)."""
    out = [patches[1 + (start + i) % 7, 40:40 + size, 40 + i * 7:40 + i * 7 + size] for i in range(n)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The reference model saved as the release is: flat .safetensors, and a DataParallel .pth."""
    folder = tmp_path_factory.mktemp("published")
    arch = load_stainfuser()
    state = {k: v.detach().contiguous() for k, v in arch.state_dict().items()}
    save_file(state, str(folder / "checkpoint.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "checkpoint.pth")
    (folder / "unet.json").write_text(json.dumps(TINY_UNET))
    (folder / "vae.json").write_text(json.dumps(TINY_VAE))
    return folder, arch, state


def convert(src, out, *flags, configs=True):
    folder = src.parent
    extra = ["--unet-config", str(folder / "unet.json"), "--vae-config", str(folder / "vae.json")] if configs else []
    return runner.invoke(app, ["convert", "stainfuser", str(src), "--out", str(out), *extra, *flags])


@pytest.fixture(scope="module")
def model_dir(published):
    folder, _, _ = published
    out = folder / "converted"
    result = convert(folder / "checkpoint.safetensors", out)
    assert result.exit_code == 0, result.output
    return out


# 1. the layout converts, in both formats, with every key used -----------------------------------

def test_published_keys_and_both_formats_convert_with_nothing_missing(published, model_dir, tmp_path):
    folder, arch, state = published
    assert {"conditioner.encoder_projector.weight", "noise_predictor.encoder_projector.weight",
            "encoder.encoder.conv_in.weight", "conditioner.controlnet_cond_embedding.blocks.5.weight",
            "conditioner.controlnet_mid_block.weight", "noise_predictor.conv_out.weight"} <= set(state)
    assert {k.split(".")[0] for k in state} == {"encoder", "conditioner", "noise_predictor"}
    assert state["conditioner.encoder_projector.weight"].shape == (8, 4)  # Linear 4 -> cross_attention_dim
    assert state["conditioner.controlnet_cond_embedding.conv_in.weight"].shape[1] == 3  # RGB, not 4
    record = json.loads((model_dir / "conversion.json").read_text())
    assert record["keys"] == {"vae": sum(k.startswith("encoder.") for k in state),
                              "unet": sum(k.startswith("noise_predictor.") for k in state),
                              "controlnet": sum(k.startswith("conditioner.") for k in state)}
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StainFuserPipeline" and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]
    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    net_cfg = json.loads((model_dir / "controlnet" / "config.json").read_text())
    assert unet_cfg["encoder_hid_dim"] == net_cfg["encoder_hid_dim"] == 4
    assert unet_cfg["encoder_hid_dim_type"] == net_cfg["encoder_hid_dim_type"] == "text_proj"
    assert net_cfg["conditioning_embedding_out_channels"] == [16, 32, 96, 256] and net_cfg["conditioning_channels"] == 3
    unet = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    net = load_file(str(model_dir / "controlnet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(unet["encoder_hid_proj.weight"], state["noise_predictor.encoder_projector.weight"])
    assert torch.equal(net["encoder_hid_proj.bias"], state["conditioner.encoder_projector.bias"])
    assert torch.equal(vae["decoder.conv_out.weight"], state["encoder.decoder.conv_out.weight"])
    assert torch.equal(net["controlnet_down_blocks.0.weight"], state["conditioner.controlnet_down_blocks.0.weight"])
    result = convert(folder / "checkpoint.pth", tmp_path / "from_pth")
    assert result.exit_code == 0, result.output
    for part in ("unet", "controlnet", "vae"):
        a = load_file(str(model_dir / part / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "from_pth" / part / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_configs_are_sd21_base_and_packaged():
    shapes = expected_checkpoint_shapes()
    assert shapes["noise_predictor.encoder_projector.weight"] == shapes["conditioner.encoder_projector.weight"] == (
        1024, 4)
    assert shapes["conditioner.controlnet_cond_embedding.conv_in.weight"] == (16, 3, 3, 3)
    assert shapes["conditioner.controlnet_cond_embedding.conv_out.weight"] == (320, 256, 3, 3)

    def count(prefix):
        return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix))

    # SD-2.1-base: UNet 865,910,724 (+ the 4->1024 projector), VAE 83,653,863
    assert count("noise_predictor.") == 865_910_724 + 5120 and count("encoder.") == 83_653_863
    configs = stainfuser_configs()
    assert configs.scheduler["skip_prk_steps"] and configs.vae["scaling_factor"] == 0.18215
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "genpath" / "pipelines"
    packaged = {p for pattern in table["genpath.pipelines"] for p in package.glob(pattern)}
    assert {CONFIG_DIR / f"{n}.json" for n in ("unet", "vae", "scheduler")} <= packaged


# 2. genpath's pipeline == the published denoising loop ------------------------------------------

def test_pipeline_matches_the_published_loop(published, model_dir, patches):
    _, arch, _ = published
    pipe = StainFuserPipeline.from_pretrained(model_dir)
    source, target = crops(patches, 1), crops(patches, 1, start=3)
    noise = torch.randn(1, 4, 4, 4, generator=gen(9))
    expected, tgt_tokens = reference_restain(arch, source, target, noise, gen(7))
    assert expected.std() > 0.05  # a meaningful comparison, not a flat image
    tokens = pipe.encode_target(target, generator=gen(7))
    torch.testing.assert_close(tokens, tgt_tokens, atol=1e-6, rtol=0)
    out = pipe(source, target_tokens=tokens, latents=noise)
    assert isinstance(out, StainFuserPipelineOutput) and len(pipe.scheduler.timesteps) == 21  # 20 PLMS steps
    assert (out.images - expected).abs().max() <= 1e-4
    # with an image target and one generator: target sample first, then the noise (the published order)
    g = gen(5)
    with torch.no_grad():
        ref_tokens = arch.encoder.encode(target).latent_dist.sample(g)  # the first draw of g ...
    expected, _ = reference_restain(arch, source, target, torch.randn(1, 4, 4, 4, generator=g), gen(5))  # ... then
    images, used = pipe(source, target=target, generator=gen(5), return_dict=False)
    assert (images - expected).abs().max() <= 1e-4
    torch.testing.assert_close(used, (ref_tokens * 0.18215).reshape(1, 4, -1).permute(0, 2, 1))


def test_diffusers_controlnet_does_not_apply_its_projector(published, model_dir):
    """Why the pipeline applies controlnet.encoder_hid_proj itself."""
    _, arch, _ = published
    pipe = StainFuserPipeline.from_pretrained(model_dir)
    x, cond, tokens = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32), torch.randn(1, 16, 4)
    with torch.no_grad():
        down_ref, _ = arch.conditioner(x, 10, encoder_hidden_states=tokens, controlnet_cond=cond, return_dict=False)
        down, _ = pipe.controlnet(x, 10, encoder_hidden_states=pipe.controlnet.encoder_hid_proj(tokens),
                                  controlnet_cond=cond, return_dict=False)
        torch.testing.assert_close(down[-1], down_ref[-1])
        with pytest.raises(RuntimeError):  # raw 4-d tokens reach the 8-d cross-attention unprojected
            pipe.controlnet(x, 10, encoder_hidden_states=tokens, controlnet_cond=cond, return_dict=False)


def test_pipeline_batch_invariant_deterministic_and_checked(model_dir, patches):
    pipe = StainFuserPipeline.from_pretrained(model_dir)
    source, target = crops(patches, 4), crops(patches, 1, start=5)
    tokens = pipe.encode_target(target, generator=gen(1))
    full = pipe(source, target_tokens=tokens, num_inference_steps=5, generator=gen(0)).images
    singles = torch.cat([pipe(source[i:i + 1], target_tokens=tokens, num_inference_steps=5,
                              generator=gen(0)).images for i in range(4)])
    torch.testing.assert_close(full, singles, atol=1e-5, rtol=0)
    again = pipe(source, target_tokens=tokens, num_inference_steps=5).images  # default generator: seed 0
    assert torch.equal(full, again)
    assert not torch.allclose(full, pipe(source, target_tokens=tokens, num_inference_steps=5, generator=gen(1)).images)
    for kwargs, message in [({}, "target: expected exactly one"),
                            ({"target": target, "target_tokens": tokens}, "target: expected exactly one"),
                            ({"target_tokens": torch.randn(1, 5, 3)}, "target_tokens: expected"),
                            ({"target_tokens": tokens * float("nan")}, "target_tokens: expected finite"),
                            ({"target": target, "generator": [gen(0)] * 4}, "generator: expected one"),
                            ({"target_tokens": tokens, "latents": torch.randn(1, 4, 3, 3)}, "latents: expected"),
                            ({"target_tokens": tokens, "num_inference_steps": 0}, "num_inference_steps")]:
        with pytest.raises(ValueError, match=message):
            pipe(source, **kwargs)
    with pytest.raises(ValueError, match="images: expected height and width divisible by the VAE factor 8"):
        pipe(torch.rand(1, 3, 36, 32), target_tokens=tokens)


# 3. genpath normalize: model_index.json picks the pipeline ---------------------------------------

def test_normalizer_picks_the_pipeline_from_model_index(model_dir, patches, tmp_path):
    norm = StainFuserNormalizer(model_dir)
    assert isinstance(norm.pipeline, StainFuserPipeline) and norm.num_inference_steps == 20
    assert not norm.detail_transfer
    small = StainFuserNormalizer(SAMPLES / "checkpoints" / "stainfuser_small")
    assert type(small.pipeline) is StainTransferPipeline and small.num_inference_steps == 4 and small.detail_transfer
    with pytest.raises(ValueError, match="detail_transfer: expected None or False for a StainFuserPipeline"):
        StainFuserNormalizer(model_dir, detail_transfer=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixCellPipeline"}))
    with pytest.raises(ValueError, match="model: expected a StainTransferPipeline or StainFuserPipeline folder, "
                                         "got _class_name 'PixCellPipeline'"):
        StainFuserNormalizer(other)
    # the normalizer == the pipeline with the target sampled from seed + 1 and the noise from seed
    target, tiles = crops(patches, 1, size=64, start=2), crops(patches, 3, start=4)
    norm = StainFuserNormalizer(model_dir, num_inference_steps=3, seed=4).fit(target)
    tokens = norm.pipeline.encode_target(target, generator=gen(5))
    assert torch.equal(norm.style_tokens, tokens) and tokens.shape == (1, 64, 4)  # 8x8 cells of a 64-px target
    white = torch.ones(1, 3, 32, 32)
    out, valid = norm(torch.cat([tiles, white]), return_valid=True)
    expected = norm.pipeline(tiles, target_tokens=tokens, num_inference_steps=3, generator=gen(4)).images
    torch.testing.assert_close(out[:3], expected, atol=1e-5, rtol=0)
    assert valid.tolist() == [True, True, True, False] and torch.equal(out[3], white[0])
    norm.save(tmp_path / "state.safetensors")
    loaded = StainNormalizer.load(tmp_path / "state.safetensors")
    assert isinstance(loaded.pipeline, StainFuserPipeline)
    torch.testing.assert_close(loaded(tiles), out[:3], atol=1e-5, rtol=0)


def write_png(tensor, path):
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_normalize_tiles_cli_matches_reference_deterministic_and_batch_invariant(published, model_dir, patches,
                                                                                 tmp_path):
    _, arch, _ = published
    inputs = tmp_path / "in"
    inputs.mkdir()
    tiles = crops(patches, 4)
    for i, tile in enumerate(tiles):
        write_png(tile, inputs / f"t{i}.png")
    write_png(crops(patches, 1, start=6)[0], tmp_path / "target.png")
    outs = {}
    for name, batch in (("b4", "4"), ("b1", "1"), ("again", "4")):
        result = runner.invoke(app, ["normalize", "tiles", str(inputs), "--method", "stainfuser", "--model",
                                     str(model_dir), "--target", str(tmp_path / "target.png"), "--out",
                                     str(tmp_path / name), "--batch-size", batch])
        assert result.exit_code == 0, result.output
        outs[name] = {p.name: np.array(Image.open(p)) for p in sorted((tmp_path / name).glob("*.png"))}
    assert list(outs["b4"]) == [f"t{i}.png" for i in range(4)]
    for name in outs["b4"]:
        assert np.array_equal(outs["b4"][name], outs["again"][name])  # deterministic
        assert np.abs(outs["b4"][name].astype(int) - outs["b1"][name]).max() <= 1  # batch of 4 == 4 singles
    # each tile == the published loop with the normalizer's draws (target: seed 0 + 1, noise: seed 0)
    target = read_png(tmp_path / "target.png")[None]
    for i in range(4):
        source = read_png(inputs / f"t{i}.png")[None]
        expected, _ = reference_restain(arch, source, target, torch.randn(1, 4, 4, 4, generator=gen(0)), gen(1))
        got = read_png(tmp_path / "b4" / f"t{i}.png")[None]
        assert (got - expected).abs().max() <= 1 / 255 + 1e-6


def test_normalize_slide_cli_overlap_background_resume(model_dir, patches, tmp_path):
    import tifffile

    from genpath.io.slide import open_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    image = np.full((128, 256, 3), 242, np.uint8)  # right half background
    image[:, :128] = patches[4, :128, :128]
    tifffile.imwrite(slides / "s.tif", image, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    write_png(crops(patches, 1, size=64, start=1)[0], tmp_path / "target.png")
    args = ["normalize", "slides", str(slides), "--method", "stainfuser", "--model", str(model_dir), "--target",
            str(tmp_path / "target.png"), "--tile-size", "64", "--format", "ome-zarr"]
    for name in ("a", "b"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert "overlap: 32" in (tmp_path / "a" / "config.yaml").read_text()  # stainfuser: feathered windows by default
    with open_slide(tmp_path / "a" / "s.ome.zarr") as a, open_slide(tmp_path / "b" / "s.ome.zarr") as b:
        first, second = (s.read_region((0, 0), 0, (256, 128)) for s in (a, b))
    assert np.array_equal(first, second)  # deterministic, whatever the batch a window was in
    assert np.abs(first[:, :96].astype(int) - image[:, :96]).mean() > 0.5  # the model restained the tissue
    # the last tile column's windows (tile +- 32 px overlap, x >= 160) see only background: passed through, never
    # modelled; from x = 224 on no window holding tissue (x < 224) is blended in
    assert np.abs(first[:, 224:].astype(int) - image[:, 224:]).max() <= 1
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0 and "resumed) 1" in result.output.replace("\n", " ")


# 4. hostile inputs: one line, exit 2, nothing written, no code run --------------------------------

class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('GENPATH_TEST_MARKER', '/tmp/genpath_stainfuser_pwned')}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_code_executing_pickle_is_refused_unrun(tmp_path, monkeypatch, published):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GENPATH_TEST_MARKER", str(marker))
    folder, _, state = published
    bad = tmp_path / "checkpoint.pth"
    with open(bad, "wb") as handle:
        pickle.dump({"encoder.x": Exploit()}, handle)
    for f in ("unet.json", "vae.json"):
        (tmp_path / f).write_text((folder / f).read_text())
    result = convert(bad, tmp_path / "o")
    assert result.exit_code == 2 and "genpath never unpickles code" in result.output
    assert not marker.exists() and not (tmp_path / "o").exists()


def hostile_cases(tmp, state):
    (tmp / "unet.json").write_text(json.dumps(TINY_UNET))
    (tmp / "vae.json").write_text(json.dumps(TINY_VAE))
    ok = tmp / "ok.safetensors"
    save_file(state, str(ok))
    wrong = {k: v for k, v in state.items() if k != "noise_predictor.encoder_projector.weight"}
    save_file({**wrong, "noise_predictor.extra.weight": torch.zeros(1)}, str(tmp / "wrong.safetensors"))
    save_file({"model.1.weight": torch.zeros(1)}, str(tmp / "other.safetensors"))
    (tmp / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp / "bad.json").write_text("{not json")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "cls.json").write_text(json.dumps({**TINY_UNET, "_class_name": "AutoencoderKL"}))
    (tmp / "wide.json").write_text(json.dumps({**TINY_UNET, "block_out_channels": [16, 32]}))
    (tmp / "nobuild.json").write_text(json.dumps({**TINY_UNET, "block_out_channels": [8]}))
    (tmp / "a_file").write_text("x")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("x")
    u, v = ["--unet-config", str(tmp / "unet.json")], ["--vae-config", str(tmp / "vae.json")]
    return [
        ([str(tmp / "missing.safetensors"), *u, *v], "src: expected a StainFuser checkpoint file"),
        ([str(tmp), *u, *v], "(a folder)"),
        ([str(tmp / "wrong.safetensors"), *u, *v], "1 missing [noise_predictor.encoder_projector.weight] and 1 "
                                                   "unexpected [noise_predictor.extra.weight]"),
        ([str(tmp / "other.safetensors"), *u, *v], "not a StainFuser checkpoint?"),
        ([str(tmp / "corrupt.safetensors"), *u, *v], "src: expected a weights-only state dict"),
        ([str(ok), "--unet-config", str(tmp / "bad.json"), *v], "unet_config: expected a JSON config"),
        ([str(ok), "--unet-config", str(tmp / "list.json"), *v], "unet_config: expected a JSON object"),
        ([str(ok), "--unet-config", str(tmp / "cls.json"), *v], "expected a UNet2DConditionModel config"),
        ([str(ok), "--unet-config", str(tmp / "none.json"), *v], "unet_config: expected a JSON config file"),
        ([str(ok), "--unet-config", str(tmp / "nobuild.json"), *v], "unet_config: expected a config that builds"),
        ([str(ok), "--unet-config", str(tmp / "wide.json"), *v], "src: expected tensor shapes that fit the configs"),
        ([str(ok), *u], "0 unexpected [] keys"),  # the shipped SD VAE (2 layers per block) vs tiny weights
        ([str(ok), "--scheduler-config", str(tmp / "bad.json"), *u, *v], "scheduler_config: expected a JSON"),
    ]


def test_hostile_inputs_exit_2_in_one_line(tmp_path, published):
    _, _, state = published
    for args, message in hostile_cases(tmp_path, state):
        result = runner.invoke(app, ["convert", "stainfuser", *args, "--out", str(tmp_path / "o")])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.output)
        assert not (tmp_path / "o").exists()
    ok = ["convert", "stainfuser", str(tmp_path / "ok.safetensors"), "--unet-config", str(tmp_path / "unet.json"),
          "--vae-config", str(tmp_path / "vae.json")]
    for out, message in (("a_file", "out: expected an output folder, got the existing file"),
                         ("full", "out: expected a new or empty folder")):
        result = runner.invoke(app, [*ok, "--out", str(tmp_path / out)])
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "full" / "keep.txt").exists()
    result = runner.invoke(app, [*ok, "--out", str(tmp_path / "full"), "--overwrite"])
    assert result.exit_code == 0 and not (tmp_path / "full" / "keep.txt").exists()


def test_convert_help_names_stainfuser():
    result = runner.invoke(app, ["convert", "--help"], terminal_width=400)
    assert result.exit_code == 0 and "stainfuser" in result.output and "pix2pix" in result.output
    result = runner.invoke(app, ["convert", "stainfuser", "--help"], terminal_width=400)
    assert all(flag in result.output for flag in ("--unet-config", "--vae-config", "--scheduler-config", "--out"))
