import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput

from genpath.models.conditioning import EmbeddingProjector
from genpath.models.vae import build_vae
from genpath.pipelines import EmbeddingToImagePipeline, EmbeddingToImagePipelineOutput, LargeImagePipelineOutput


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    projector = EmbeddingProjector(embed_dim=12, cross_attention_dim=16, num_tokens=2, hidden_dim=32)
    with torch.no_grad():
        projector.null.add_(1.0)  # make the null tokens clearly different from conditional ones
    pipeline = EmbeddingToImagePipeline(vae=vae, unet=unet, projector=projector, scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipe, e, seed=0, **kw):
    kw = {"num_inference_steps": 2, **kw}
    return pipe(e, generator=torch.Generator().manual_seed(seed), **kw).images


def test_output_contract_and_determinism(pipe):
    e = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    a, b = generate(pipe, e), generate(pipe, e)
    assert a.shape == (2, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(pipe, e, seed=1))
    assert generate(pipe, e, output_type="latent").shape == (2, 4, 8, 8)
    assert generate(pipe, e, output_type="np").shape == (2, 16, 16, 3)
    assert len(generate(pipe, e, output_type="pil")) == 2
    assert generate(pipe, e, height=24, width=32).shape == (2, 3, 24, 32)


def test_guidance_on_and_off(pipe):
    e = torch.randn(1, 12, generator=torch.Generator().manual_seed(2))
    off = generate(pipe, e, guidance_scale=1.0, output_type="latent")
    on = generate(pipe, e, guidance_scale=4.0, output_type="latent")
    assert not torch.allclose(off, on)  # guidance changes the result; 1.0 runs no null pass


def test_schedulers_and_save_load_round_trip(pipe, tmp_path):
    e = torch.randn(1, 12, generator=torch.Generator().manual_seed(3))
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "projector" / "diffusion_pytorch_model.safetensors").is_file()
    again = EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(pipe, e), generate(again, e))
    again.scheduler = DPMSolverMultistepScheduler.from_config(again.scheduler.config)
    assert generate(again, e, num_inference_steps=3).shape == (1, 3, 16, 16)


def test_bad_inputs_fail_before_compute(pipe):
    with pytest.raises(ValueError, match=r"embeddings: expected a \(B,12\)"):
        pipe(torch.randn(2, 7))
    with pytest.raises(ValueError, match="finite"):
        pipe(torch.full((1, 12), float("nan")))
    with pytest.raises(ValueError, match="VAE factor 2"):
        pipe(torch.randn(1, 12), height=15, width=16)
    with pytest.raises(ValueError, match="output_type"):
        pipe(torch.randn(1, 12), output_type="gif")


def test_large_image_shifted_windows_cost_and_layout(pipe):
    from genpath.pipelines.large_image import generate_large_image, seam_score

    grid = torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(4))
    shifted = generate_large_image(pipe, grid, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert shifted.images.shape == (1, 3, 48, 32)
    assert shifted.cost_ratio == 1.0  # every latent pixel once per step
    again = generate_large_image(pipe, grid, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shifted.images, again.images)
    overlap = generate_large_image(pipe, grid, num_inference_steps=3, mode="overlap", overlap=4,
                                   generator=torch.Generator().manual_seed(0))
    assert overlap.cost_ratio > 1.0
    assert seam_score(shifted.images, 16) > 0
    with pytest.raises(ValueError, match="embedding_grid"):
        generate_large_image(pipe, torch.randn(4, 12))


def test_seam_score_detects_a_step():
    flat = torch.rand(3, 64, 64) * 0.05 + 0.5
    stepped = flat.clone()
    stepped[:, :, 32:] += 0.3
    from genpath.pipelines.large_image import seam_score

    assert seam_score(stepped, 32) > 5 * seam_score(flat, 32)


def test_output_dataclass_return_dict_and_generator_lists(pipe):
    e = torch.randn(2, 12, generator=torch.Generator().manual_seed(5))
    out = pipe(e, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, EmbeddingToImagePipelineOutput) and isinstance(out, BaseOutput)
    as_tuple = pipe(e, num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], out.images)
    # one generator per image: an image does not depend on its batch
    both = pipe(e, num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (7, 8)]).images
    alone = [pipe(e[i : i + 1], num_inference_steps=2, generator=[torch.Generator().manual_seed(s)]).images
             for i, s in enumerate((7, 8))]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"generator: expected one generator per image \(2\), got 1"):
        pipe(e, generator=[torch.Generator()])


def test_one_loading_path_checks_and_stays_quiet(pipe, tmp_path, capfd):
    pipe.save_pretrained(tmp_path / "p")
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch_dtype deprecation, no other warning
        again = EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")
    assert "Loading pipeline components" not in capfd.readouterr().err  # no loading progress bar
    assert next(again.unet.parameters()).dtype == torch.float32
    assert again._progress_bar_config == {"disable": True}
    half = EmbeddingToImagePipeline.from_pretrained(tmp_path / "p", dtype=torch.float16, disable_progress_bar=False)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert "disable" not in getattr(half, "_progress_bar_config", {})
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path: expected a local .*\\(missing"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path: .*not a folder"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path)
    from genpath.pipelines import MaskToImagePipeline, StainTransferPipeline

    with pytest.raises(ValueError, match="checkpoint of StainTransferPipeline .* 'EmbeddingToImagePipeline'"):
        StainTransferPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="expected a checkpoint of MaskToImagePipeline"):
        MaskToImagePipeline.from_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    del index["projector"]
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"expected components .* got \['projector'\] missing"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "p")


def test_mismatched_components_are_named(pipe, tmp_path):
    other = EmbeddingProjector(embed_dim=12, cross_attention_dim=8, num_tokens=2, hidden_dim=32)
    EmbeddingToImagePipeline(vae=pipe.vae, unet=pipe.unet, projector=other,
                             scheduler=pipe.scheduler).save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="projector: expected cross_attention_dim 16"):
        EmbeddingToImagePipeline.from_pretrained(tmp_path / "bad")


def test_large_image_output_dataclass_and_tuple(pipe):
    from genpath.pipelines.large_image import generate_large_image

    grid = torch.randn(1, 2, 12, generator=torch.Generator().manual_seed(4))
    out = generate_large_image(pipe, grid, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, LargeImagePipelineOutput) and isinstance(out, BaseOutput)
    images, unet_pixels, tile_pixels, calls = generate_large_image(
        pipe, grid, num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert torch.equal(images, out.images) and (unet_pixels, tile_pixels, calls) == (
        out.unet_pixels, out.tile_pixels, out.unet_calls)
    with pytest.raises(ValueError, match="generator"):
        generate_large_image(pipe, grid, generator=[torch.Generator()])
