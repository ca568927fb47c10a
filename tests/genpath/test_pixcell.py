"""PixCell-256 / -1024 and the cell-mask ControlNet from folders in exactly the published hub layout.

The tiny models are saved the way ``StonyBrook-CVLab/PixCell-256``, ``-1024`` and
``-256-Cell-ControlNet`` store theirs (``model_index.json`` naming the custom pipeline and module
files, ``transformer/config.json`` of a ``PixCellTransformer2DModel`` with ``caption_num_tokens``,
its safetensors holding ``caption_projection.uncond_embedding`` and ``y_pos_embed.y_pos_embed``,
``scheduler/`` DPM-Solver, ``vae/config.json`` only, ``controlnet/`` a ``PixCellControlNet``), and
genpath's output is compared with a sampling loop written here from PixCell's published code
(``controlnet/pixcell_transformer_2d.py`` forward, ``pixcell_controlnet*.py``, ``tools/sample_*.py``
decode, diffusers' PixArt-Σ pipeline loop) on fixed noise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
from safetensors.torch import save_file
from typer.testing import CliRunner

from genpath.cli import app
from genpath.models.vae import decode_tiled, encode_tiled
from genpath.pipelines.pixcell import PixCellPipeline, caption_pos_embed, crop_grid, pixcell_tokens

DIM, HEADS, HEAD_DIM, SAMPLE, PATCH = 12, 2, 8, 8, 2  # tiny: UNI width 12, inner 16, 8x8 latents (16 px)
SCALE, SHIFT = 1.5305, 0.0609
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.29.0",
             "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
             "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0, "thresholding": False,
             "timestep_spacing": "linspace", "trained_betas": None, "use_karras_sigmas": False}


# ---- reference: PixCell's published code, transcribed ------------------------------------------------

def ref_pos_embed(dim, grid, base_size, interpolation_scale, phase):
    """``pixcell_get_2d_sincos_pos_embed`` (PixCell controlnet/pixcell_transformer_2d.py), numpy float64."""
    g = np.arange(grid, dtype=np.float32) / (grid / base_size) / interpolation_scale
    mesh = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid, grid)  # here w goes first

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1) + phase, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one(dim // 2, mesh[0]), one(dim // 2, mesh[1])], axis=1)).float()[None]


def ref_forward(m, extra, x, y, t, residuals=None):
    """``PixCellTransformer2DModel.forward`` (and its ControlNet variant's residual add), on the module's parts."""
    b, p = x.shape[0], m.config.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    hs = m.pos_embed(x)
    temb, emb_t = m.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=b, hidden_dtype=hs.dtype)
    if "y_pos_embed.y_pos_embed" in extra:
        y = y + extra["y_pos_embed.y_pos_embed"]
    y = m.caption_projection(y).view(b, -1, hs.shape[-1])
    for i, block in enumerate(m.transformer_blocks):
        hs = block(hs, encoder_hidden_states=y, timestep=temb)
        if residuals is not None and i < len(residuals):
            hs = hs + residuals[i]
    shift, scale = (m.scale_shift_table[None] + emb_t[:, None]).chunk(2, dim=1)
    hs = m.proj_out(m.norm_out(hs) * (1 + scale) + shift)
    hs = torch.einsum("nhwpqc->nchpwq", hs.reshape(-1, h, w, p, p, m.out_channels))
    return hs.reshape(-1, m.out_channels, h * p, w * p)


def ref_controlnet(cn, x, cond, y, t, scale=1.0):
    """``PixCellControlNet.forward`` (PixCell controlnet/pixcell_controlnet.py) on a base-shaped module + extras."""
    base, extra = cn
    b = x.shape[0]
    hs = base.pos_embed(x) + extra["cond_pos_embed"](cond)
    temb, _ = base.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=b, hidden_dtype=hs.dtype)
    y = base.caption_projection(y).view(b, -1, hs.shape[-1])
    outs = []
    for block, linear in zip(base.transformer_blocks, extra["controlnet_blocks"], strict=False):
        hs = block(hs, encoder_hidden_states=y, timestep=temb)
        outs.append(linear(hs) * scale)
    return outs


def ref_sample(model, extra, vae, uni, noise, steps, guidance, control=None):
    """PixArt-Σ's pipeline loop as PixCell uses it: guidance with the stored unconditional embedding,
    learned sigma (first 16 channels), ``latents / scale + shift`` decode (tools/sample_256.py)."""
    sched = DPMSolverMultistepScheduler.from_config(SCHEDULER)
    sched.set_timesteps(steps)
    uncond = extra["caption_projection.uncond_embedding"][None].repeat(uni.shape[0], 1, 1)
    y = torch.cat([uncond, uni])
    lat = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat] * 2), t)
            tt = t.expand(inp.shape[0])
            res = None
            if control is not None:
                cn, cond = control
                res = ref_controlnet(cn, inp, torch.cat([cond] * 2), y, tt)
            out = ref_forward(model, extra, inp, y, tt, res)
            u, c = out.chunk(2)
            out = (u + guidance * (c - u)).chunk(2, dim=1)[0]
            lat = sched.step(out, t, lat).prev_sample
        img = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((img + 1) / 2).clamp(0, 1)


# ---- tiny models in the published layout ---------------------------------------------------------------

def tiny_vae(shift=SHIFT):
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=16, scaling_factor=SCALE,
                         shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
                         mid_block_add_attention=False).eval()


def transformer_config(tokens, interpolation, layers=1):
    return {"_class_name": "PixCellTransformer2DModel", "_diffusers_version": "0.32.2", "activation_fn":
            "gelu-approximate", "attention_bias": True, "attention_head_dim": HEAD_DIM, "attention_type": "default",
            "caption_channels": DIM, "caption_num_tokens": tokens, "cross_attention_dim": HEADS * HEAD_DIM,
            "dropout": 0.0, "in_channels": 16, "interpolation_scale": interpolation, "norm_elementwise_affine": False,
            "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": HEADS,
            "num_embeds_ada_norm": 1000, "num_layers": layers, "out_channels": 32, "patch_size": PATCH,
            "sample_size": SAMPLE, "upcast_attention": False, "use_additional_conditions": False}


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def build_transformer(tokens, interpolation, seed=0, layers=1):
    config = transformer_config(tokens, interpolation, layers)
    model = randomize(PixArtTransformer2DModel(**{k: v for k, v in config.items()
                                                  if not k.startswith("_") and k != "caption_num_tokens"}), seed)
    g = torch.Generator().manual_seed(seed + 100)
    extra = {"caption_projection.uncond_embedding": torch.randn(tokens, DIM, generator=g) / DIM**0.5}
    if tokens > 1:
        extra["y_pos_embed.y_pos_embed"] = ref_pos_embed(DIM, int(tokens**0.5), SAMPLE // PATCH, 2, SAMPLE // PATCH
                                                         // tokens)
    return config, model, extra


def write_pixcell(folder, tokens, interpolation, control=None, vae_weights=False):
    """A hub-layout PixCell folder (``control``: add a PixCellControlNet, PixCell-256-Cell-ControlNet style)."""
    config, model, extra = build_transformer(tokens, interpolation)
    (folder / "transformer").mkdir(parents=True)
    if control:
        config["_class_name"] = "PixCellTransformer2DModelControlNet"
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    save_file({**model.state_dict(), **extra}, str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    (folder / "transformer" / "pixcell_transformer_2d.py").write_text("raise RuntimeError('never imported')\n")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    vae = tiny_vae()
    (folder / "vae").mkdir()
    if vae_weights:
        vae.save_pretrained(folder / "vae")
    else:
        (folder / "vae" / "config.json").write_text(vae.to_json_string())
    index = {"_class_name": "PixCellPipeline", "_diffusers_version": "0.32.2",
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
             "transformer": ["pixcell_transformer_2d", "PixCellTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if control:
        index = {**index, "_class_name": "PixCellControlNetPipeline",
                 "controlnet": ["pixcell_controlnet", "PixCellControlNet"],
                 "transformer": ["pixcell_controlnet_transformer", "PixCellTransformer2DModelControlNet"]}
        (folder / "controlnet").mkdir()
        (folder / "controlnet" / "config.json").write_text(json.dumps(control[0]))
        save_file(control[1], str(folder / "controlnet" / "diffusion_pytorch_model.safetensors"))
    (folder / "model_index.json").write_text(json.dumps(index))
    return model, extra, vae


def build_controlnet(blocks=1):
    """A PixCellControlNet's config and state dict, built from a base-shaped PixArt transformer + its extras."""
    config, base, extra = build_transformer(1, 0.5, seed=7, layers=2)
    base.transformer_blocks = base.transformer_blocks[:blocks]
    g = torch.Generator().manual_seed(9)
    cond = torch.nn.Conv2d(16, HEADS * HEAD_DIM, PATCH, stride=PATCH)
    linears = torch.nn.ModuleList([torch.nn.Linear(HEADS * HEAD_DIM, HEADS * HEAD_DIM) for _ in range(blocks)])
    with torch.no_grad():  # trained (non-zero) ControlNet weights
        for p in [*cond.parameters(), *linears.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    from diffusers.models.embeddings import PatchEmbed

    cond_embed = PatchEmbed(height=SAMPLE, width=SAMPLE, patch_size=PATCH, in_channels=16,
                            embed_dim=HEADS * HEAD_DIM, interpolation_scale=0.5)
    cond_embed.proj = cond
    state = {**base.state_dict(), **extra, "cond_pos_embed.proj.weight": cond.weight, "cond_pos_embed.proj.bias":
             cond.bias, **{f"controlnet_blocks.{i}.{k}": v for i, m in enumerate(linears)
                           for k, v in m.state_dict().items()}}
    config = {**config, "_class_name": "PixCellControlNet", "n_controlnet_blocks": blocks}
    return (config, {k: v.detach().clone().contiguous() for k, v in state.items()}), (base, {
        "cond_pos_embed": cond_embed.eval(), "controlnet_blocks": linears.eval()})


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixcell")
    vae = tiny_vae()
    vae.save_pretrained(root / "sd35-vae")
    return {"root": root, "vae": root / "sd35-vae",
            "256": (root / "PixCell-256", *write_pixcell(root / "PixCell-256", 1, 0.5)),
            "1024": (root / "PixCell-1024", *write_pixcell(root / "PixCell-1024", 16, 2.0))}


# ---- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["256", "1024"])
def test_published_folder_matches_the_reference_loop(published, variant):
    folder, model, extra, vae = published[variant]
    pipe = PixCellPipeline.from_pretrained(folder, vae=published["vae"])
    tokens = pipe.num_tokens
    assert tokens == (1 if variant == "256" else 16) and pipe.default_size == 16
    uni = torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 16, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(4))
    ours = pipe(uni, latents=noise.clone(), num_inference_steps=3, guidance_scale=2.5).images
    ref = ref_sample(model, extra, vae, uni, noise, 3, 2.5)
    assert ours.shape == (2, 3, 16, 16)
    assert (ours - ref).abs().max() <= 1e-4
    if variant == "1024":  # the positions genpath would compute equal the stored buffer
        stored = extra["y_pos_embed.y_pos_embed"]
        assert torch.allclose(caption_pos_embed(DIM, 16, SAMPLE // PATCH), stored, atol=1e-6)
        assert torch.equal(pipe.token_positions, stored)


def test_loading_needs_the_sd35_vae_and_checks_it(published, tmp_path):
    folder = published["256"][0]
    with pytest.raises(FileNotFoundError, match="SD3.5 VAE"):
        PixCellPipeline.from_pretrained(folder)
    tiny_vae(shift=0.5).save_pretrained(tmp_path / "other-vae")
    with pytest.raises(ValueError, match="shift_factor 0.0609"):
        PixCellPipeline.from_pretrained(folder, vae=tmp_path / "other-vae")
    result = CliRunner().invoke(app, ["synth", "--model", str(folder), "--embeddings", str(tmp_path / "x.npy"),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "SD3.5 VAE" in result.output


def test_crop_grid_is_row_major_and_tokens_follow_it():
    image = torch.zeros(2, 3, 16, 16)
    for i in range(4):
        for j in range(4):
            image[:, :, 4 * i: 4 * i + 4, 4 * j: 4 * j + 4] = 4 * i + j
    image[1] += 100

    def stub(crops):  # an encoder returning the crop's index
        return crops.mean(dim=(1, 2, 3))[:, None].expand(-1, DIM)

    tokens = pixcell_tokens(stub, image, 16)
    assert tokens.shape == (2, 16, DIM)
    assert tokens[0, :, 0].tolist() == list(range(16)) and tokens[1, :, 0].tolist() == [100 + k for k in range(16)]
    assert torch.equal(crop_grid(image, 1), image)


def test_wrong_token_count_raises(published):
    p256 = PixCellPipeline.from_pretrained(published["256"][0], vae=published["vae"])
    p1024 = PixCellPipeline.from_pretrained(published["1024"][0], vae=published["vae"])
    assert p256.check_embeddings(torch.zeros(2, DIM)).shape == (2, 1, DIM)
    with pytest.raises(ValueError, match=r"embeddings: expected \(B, 16, 12\) .*4x4 row-major grid.*got \(1, 4, 12\)"):
        p1024(torch.zeros(1, 4, DIM), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"expected \(B, 16, 12\)"):
        p1024(torch.zeros(1, DIM), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"expected \(B, 1, 12\)"):
        p256(torch.zeros(1, 16, DIM), num_inference_steps=1)
    with pytest.raises(ValueError, match="finite"):
        p256(torch.full((1, DIM), float("nan")), num_inference_steps=1)


def test_shift_factor_round_trip():
    vae = tiny_vae()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
        latents = encode_tiled(vae, x)
        assert torch.allclose(latents, (z - SHIFT) * SCALE, atol=1e-6)
        back = decode_tiled(vae, latents)
        assert torch.allclose(back, ((vae.decode(z).sample + 1) / 2).clamp(0, 1), atol=1e-5)
        plain = tiny_vae(shift=None)
        assert torch.allclose(encode_tiled(plain, x), plain.encode(x * 2 - 1).latent_dist.mean * SCALE, atol=1e-6)


def test_folder_code_is_never_imported_and_foreign_components_are_refused(published, tmp_path):
    import shutil
    import sys

    folder = tmp_path / "p"
    shutil.copytree(published["256"][0], folder)
    PixCellPipeline.from_pretrained(folder, vae=published["vae"])
    assert "pixcell_transformer_2d" not in sys.modules
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["my_scheduler", "DPMSolverMultistepScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="got scheduler from 'my_scheduler'"):
        PixCellPipeline.from_pretrained(folder, vae=published["vae"])
    index["scheduler"], index["transformer"] = ["diffusers", "DPMSolverMultistepScheduler"], ["os", "system"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="got transformer from 'os'"):
        PixCellPipeline.from_pretrained(folder, vae=published["vae"])


def test_vae_weights_in_the_folder_are_used_when_present(tmp_path):
    write_pixcell(tmp_path / "p", 1, 0.5, vae_weights=True)
    assert PixCellPipeline.from_pretrained(tmp_path / "p").vae.config.latent_channels == 16


def test_mask_controlnet_matches_the_reference_loop_and_runs_in_synth_masks(published, tmp_path):
    from genpath.pipelines.pixcell_controlnet import PixCellControlNetPipeline

    stored, (base, extras) = build_controlnet()
    folder = tmp_path / "PixCell-256-Cell-ControlNet"
    model, extra, vae = write_pixcell(folder, 1, 0.5, control=stored)
    pipe = PixCellControlNetPipeline.from_pretrained(folder, vae=published["vae"])
    masks = torch.zeros(2, 16, 16, dtype=torch.int64)
    masks[0, 2:7, 3:9], masks[1, 8:14, 1:6] = 1, 2
    uni = torch.randn(2, 1, DIM, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 16, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(6))
    ours = pipe(masks, embeddings=uni, latents=noise.clone(), num_inference_steps=2, guidance_scale=2.0).images
    mask_rgb = (masks > 0).float()[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        cond = (vae.encode(2 * (mask_rgb - 0.5)).latent_dist.mean - SHIFT) * SCALE
    ref = ref_sample(model, extra, vae, uni, noise, 2, 2.0, control=((base, extras), cond))
    assert (ours - ref).abs().max() <= 1e-4
    no_mask = pipe(masks, embeddings=uni, latents=noise.clone(), num_inference_steps=2,
                   controlnet_conditioning_scale=0.0).images
    assert (no_mask - ours).abs().max() > 1e-3  # the mask matters
    np.savez(tmp_path / "m.npz", instances=masks.numpy().astype(np.int32))
    command = ["synth", "--masks", str(tmp_path / "m.npz"), "--model", str(folder), "--vae", str(published["vae"]),
               "--steps", "2", "--n-per-condition", "1"]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "pairs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import zarr

    pairs = zarr.open_group(str(tmp_path / "pairs" / "pairs.zarr"), mode="r")
    assert pairs["images"].shape == (2, 3, 16, 16) and np.array_equal(pairs["instances"][...], masks.numpy())
    _stub_encoder_family()  # style from images, embedded by --encoder
    from genpath.io.images import write_image

    (tmp_path / "style").mkdir()
    write_image(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)), tmp_path / "style" / "s.png")
    result = CliRunner().invoke(app, [*command, "--style-from", str(tmp_path / "style"), "--encoder",
                                      "pixcell-test-stub", "--out", str(tmp_path / "styled")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    styled = zarr.open_group(str(tmp_path / "styled" / "pairs.zarr"), mode="r")["images"][...]
    assert styled.shape == (2, 3, 16, 16) and not np.array_equal(styled, pairs["images"][...])
    result = CliRunner().invoke(app, ["synth", "--model", str(folder), "--vae", str(published["vae"]), "--embeddings",
                                      str(tmp_path / "m.npz"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "use it with --masks" in result.output


def _stub_encoder_family():
    from genpath.encoders.base import ImageEncoder
    from genpath.encoders.registry import register_encoder

    class Stub(ImageEncoder):
        def __init__(self):
            super().__init__(DIM, 4)

        def forward(self, images):
            return images.float().mean(dim=(1, 2, 3))[:, None].expand(-1, DIM).clone()

    register_encoder("pixcell-test-stub")(lambda **_: Stub())


def test_synth_cli_end_to_end_embeddings_images_shards_and_large(published, tmp_path):
    import zarr

    from genpath.io.images import write_image

    runner = CliRunner()
    folder, vae = published["1024"][0], str(published["vae"])
    emb = tmp_path / "e.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(3, 16, DIM)).astype(np.float32))
    common = ["synth", "--model", str(folder), "--vae", vae, "--embeddings", str(emb), "--n-per-condition", "2",
              "--steps", "2", "--batch-size", "4"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "full")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    full = np.asarray(zarr.open_group(str(tmp_path / "full" / "images.zarr"), mode="r")["images"])
    assert full.shape == (6, 3, 16, 16) and np.load(tmp_path / "full" / "embeddings.npy").shape == (3, 16, DIM)
    run = json.loads((tmp_path / "full" / "run.json").read_text())["settings"]
    assert run["vae"] == str(published["vae"].resolve()) and "vae_config" in run
    for i in range(2):  # per-sample seeds, whole batches: the merged shards equal the unsharded run
        result = runner.invoke(app, [*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["synth-merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                                 str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = np.asarray(zarr.open_group(str(tmp_path / "merged" / "images.zarr"), mode="r")["images"])
    assert np.array_equal(merged, full)

    _stub_encoder_family()  # --from-images: the 4x4 grid of crops of each reference, embedded by --encoder
    refs = tmp_path / "refs"
    refs.mkdir()
    write_image(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)), refs / "a.png")
    result = runner.invoke(app, ["synth", "--model", str(folder), "--vae", vae, "--from-images", str(refs),
                                 "--encoder", "pixcell-test-stub", "--n-per-condition", "1", "--steps", "2",
                                 "--format", "png", "--out", str(tmp_path / "v")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "v" / "embeddings.npy").shape == (1, 16, DIM)
    assert (tmp_path / "v" / "images" / "cond00000_000.png").is_file()

    grid = tmp_path / "grid.npy"
    np.save(grid, np.random.default_rng(1).normal(size=(3, 5, DIM)).astype(np.float32))
    for variant in ("256", "1024"):
        out = tmp_path / f"large{variant}.png"
        result = runner.invoke(app, ["synth-large", "--model", str(published[variant][0]), "--vae", vae,
                                     "--embeddings", str(grid), "--steps", "2", "--out", str(out)],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(out.with_suffix(".json").read_text())
        cell = 16 if variant == "256" else 4  # px per grid cell: the 256-px token crop, scaled down
        assert report["size"] == [3 * cell, 5 * cell] and report["cost_ratio"] == 1.0


def test_per_sample_generators_make_outputs_batch_invariant(published):
    pipe = PixCellPipeline.from_pretrained(published["256"][0], vae=published["vae"])
    uni = torch.randn(3, 1, DIM, generator=torch.Generator().manual_seed(2))

    def gens(ids):
        return [torch.Generator().manual_seed(i) for i in ids]

    batch = pipe(uni, num_inference_steps=2, generator=gens([0, 1, 2])).images
    alone = pipe(uni[1:2], num_inference_steps=2, generator=gens([1])).images
    assert (batch[1:2] - alone).abs().max() <= 1e-5
    unguided = pipe(uni, num_inference_steps=2, guidance_scale=1.0, generator=gens([0, 1, 2]), return_dict=False)[0]
    assert unguided.shape == batch.shape and (unguided - batch).abs().max() > 1e-4


def test_transformer_weights_load_strictly(published, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "p"
    shutil.copytree(published["1024"][0], folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k != "caption_projection.uncond_embedding"}, str(weights))
    with pytest.raises(ValueError, match=r"caption_projection.uncond_embedding of shape \(16, 12\)"):
        PixCellPipeline.from_pretrained(folder, vae=published["vae"])
    save_file({**state, "extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        PixCellPipeline.from_pretrained(folder, vae=published["vae"])
    save_file({k: v for k, v in state.items() if k != "proj_out.bias"}, str(weights))
    with pytest.raises(ValueError, match=r"missing \['proj_out.bias'\]"):
        PixCellPipeline.from_pretrained(folder, vae=published["vae"])
