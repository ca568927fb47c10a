"""MaskToImagePipeline and ControlNet training on tiny seeded models."""

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel
from typer.testing import CliRunner

from genpath.encoders import SmallHistologyEncoder
from genpath.encoders.reference import save_encoder_reference
from genpath.models.conditioning import EmbeddingProjector
from genpath.models.vae import build_vae
from genpath.pipelines import EmbeddingToImagePipeline
from genpath.pipelines.mask_to_image import MaskToImagePipeline, MaskToImagePipelineOutput, controlnet_from_unet
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    """A tiny saved EmbeddingToImagePipeline with its encoder.json (a tiny genpath-small encoder)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ldm")
    SmallHistologyEncoder(widths=(8, 16), embed_dim=12).save_pretrained(root / "encoder")
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    projector = EmbeddingProjector(embed_dim=12, cross_attention_dim=16, num_tokens=2, hidden_dim=32)
    pipe = EmbeddingToImagePipeline(vae=vae, unet=unet, projector=projector, scheduler=DDIMScheduler())
    pipe.save_pretrained(root / "pipe")
    save_encoder_reference(root / "pipe", "genpath-small", {"path": root / "encoder"})
    return root / "pipe"


@pytest.fixture(scope="module")
def mask_pipe(ldm_dir):
    base = EmbeddingToImagePipeline.from_pretrained(ldm_dir)
    controlnet = controlnet_from_unet(base.unet, 2, num_types=3)
    with torch.no_grad():  # a trained ControlNet has non-zero outputs; zero-init would hide the mask
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    pipe = MaskToImagePipeline(vae=base.vae, unet=base.unet, projector=base.projector, controlnet=controlnet,
                               scheduler=base.scheduler, num_types=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def masks():
    inst = torch.zeros(2, 32, 32, dtype=torch.int64)
    inst[:, 4:12, 4:12], inst[:, 20:28, 8:16] = 1, 2
    types = (inst > 0).long()
    types[inst == 2] = 3
    return inst, types


def run(pipe, seed=0, **kw):
    inst, types = masks()
    return pipe(inst, types, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), **kw).images


def test_controlnet_starts_as_a_no_op_copy(ldm_dir):
    base = EmbeddingToImagePipeline.from_pretrained(ldm_dir)
    controlnet = controlnet_from_unet(base.unet, 2, num_types=3)
    assert controlnet.config.conditioning_channels == 5
    sample, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    tokens = base.projector.null_tokens(1)
    down, mid = controlnet(sample, t, tokens, controlnet_cond=torch.rand(1, 5, 32, 32), return_dict=False)
    assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0  # zero convolutions


def test_mask_pipeline_contract_determinism_scale_and_round_trip(mask_pipe, tmp_path):
    emb = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    a = run(mask_pipe, embeddings=emb)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, run(mask_pipe, embeddings=emb))
    assert not torch.equal(a, run(mask_pipe, seed=1, embeddings=emb))
    assert not torch.allclose(a, run(mask_pipe, embeddings=emb, controlnet_conditioning_scale=0.0))
    assert run(mask_pipe).shape == (2, 3, 32, 32)  # no embeddings: null tokens, no guidance
    mask_pipe.save_pretrained(tmp_path / "m")
    again = MaskToImagePipeline.from_pretrained(tmp_path / "m")
    again.set_progress_bar_config(disable=True)
    assert again.config.num_types == 3
    torch.testing.assert_close(run(again, embeddings=emb), a)


def test_mask_pipeline_bad_input(mask_pipe):
    inst, types = masks()
    with pytest.raises(ValueError, match="instances: expected height and width divisible"):
        mask_pipe(inst[:, :31], types[:, :31])
    with pytest.raises(ValueError, match="integer label map"):
        mask_pipe(inst.float())
    with pytest.raises(ValueError, match="type ids in 0..3, got 4"):
        mask_pipe(inst, types + 1)
    with pytest.raises(ValueError, match="embeddings"):
        mask_pipe(inst, types, embeddings=torch.randn(3, 12))
    with pytest.raises(ValueError, match="embeddings"):
        mask_pipe(inst, types, embeddings=torch.full((2, 12), float("nan")))


def test_train_controlnet_two_steps(ldm_dir, tmp_path):
    from genpath.cli import app

    images = ROOT / "samples" / "images"
    section = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["controlnet"]
    section["data"]["masks"][0].update(image=str(images / "he_hgsc_nest.jpg"),
                                       instances=str(images / "he_hgsc_nest_inst_mask.npz"),
                                       types=str(images / "he_hgsc_nest_type_mask.npz"))
    section["train"]["output_dir"] = str(tmp_path / "cn")
    section["options"]["pipeline"] = str(ldm_dir)
    (tmp_path / "cn.yaml").write_text(yaml.safe_dump({"controlnet": section}))
    result = CliRunner().invoke(app, ["train", "controlnet", "--config", str(tmp_path / "cn.yaml")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cn" / "samples" / "step-000002.png").is_file()
    pipe = MaskToImagePipeline.from_pretrained(tmp_path / "cn" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert (tmp_path / "cn" / "pipeline" / "encoder.json").is_file()
    inst, types = masks()
    full = pipe(inst, types, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    assert full.shape == (2, 3, 32, 32)
    # shipped form: the ControlNet alone (fp16) + base.json (a hint and the base's fingerprint);
    # the base lies outside the ControlNet folder, so it is given explicitly
    from genpath.encoders.reference import load_encoder_reference
    from genpath.pipelines.mask_to_image import export_controlnet

    export_controlnet(tmp_path / "cn" / "pipeline", ldm_dir, tmp_path / "shipped")
    assert not (tmp_path / "shipped" / "model_index.json").exists()
    light = MaskToImagePipeline.from_pretrained(tmp_path / "shipped", base=ldm_dir)
    assert light.config.num_types == 3 and next(light.controlnet.parameters()).dtype == torch.float32
    again = light(inst, types, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(again, full, atol=2e-2, rtol=0)
    assert load_encoder_reference(tmp_path / "shipped").embed_dim == 12


def test_mask_pipeline_output_tuple_and_batch_invariance(mask_pipe):
    inst, types = masks()
    emb = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    out = mask_pipe(inst, types, embeddings=emb, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, MaskToImagePipelineOutput)
    as_tuple = mask_pipe(inst, types, embeddings=emb, num_inference_steps=2,
                         generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.images)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = mask_pipe(inst, types, embeddings=emb, num_inference_steps=2, generator=gens(3, 4)).images
    alone = torch.cat([mask_pipe(inst[i : i + 1], types[i : i + 1], embeddings=emb[i : i + 1], num_inference_steps=2,
                                 generator=gens(s)).images for i, s in enumerate((3, 4))])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="generator"):
        mask_pipe(inst, types, generator=gens(1, 2, 3))


def test_controlnet_folder_loads_through_the_same_path(mask_pipe, ldm_dir, tmp_path):
    import json
    import os
    import warnings

    from genpath.pipelines.mask_to_image import base_fingerprint, export_controlnet

    mask_pipe.save_pretrained(tmp_path / "full")
    folder = export_controlnet(tmp_path / "full", ldm_dir, tmp_path / "cn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn", "full"]  # written atomically: no leftovers
    record = json.loads((folder / "base.json").read_text())
    assert {k: record[k] for k in ("pipeline", "num_types")} == {"pipeline": os.path.relpath(ldm_dir, folder),
                                                                 "num_types": 3}
    assert record["base_fingerprint"] == base_fingerprint(ldm_dir)
    with pytest.raises(ValueError, match="base: expected the base EmbeddingToImagePipeline folder given explicitly"):
        MaskToImagePipeline.from_pretrained(folder)  # base.json's path leaves the folder: never followed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        light = MaskToImagePipeline.from_pretrained(folder, base=ldm_dir)
    assert light.config.num_types == 3 and next(light.controlnet.parameters()).dtype == torch.float32
    assert light._progress_bar_config == {"disable": True}
    torch.testing.assert_close(run(light), run(mask_pipe), atol=2e-2, rtol=0)  # fp16 ControlNet, same images
    with pytest.raises(FileNotFoundError, match="base: expected a local EmbeddingToImagePipeline"):
        MaskToImagePipeline.from_pretrained(folder, base=tmp_path / "nowhere")
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(ldm_dir, tmp_path / "other")  # another LDM: same layout, other UNet weights
    weights = tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 1e-3 for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match="base: expected the LDM this ControlNet was trained on"):
        MaskToImagePipeline.from_pretrained(folder, base=tmp_path / "other")
    (folder / "base.json").write_text(json.dumps({"pipeline": os.path.relpath(ldm_dir, folder), "num_types": 1}))
    with pytest.raises(ValueError, match="controlnet: expected 3 conditioning channels for 1 nucleus types"):
        MaskToImagePipeline.from_pretrained(folder, base=ldm_dir)
    (folder / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match="or a ControlNet folder with base.json"):
        MaskToImagePipeline.from_pretrained(folder)


def test_mask_dataset_crops_stay_in_region_and_align(tmp_path):
    from genpath.training.mask_data import MaskTileDataset

    images = ROOT / "samples" / "images"
    spec = {"image": images / "he_hgsc_nest.jpg", "instances": images / "he_hgsc_nest_inst_mask.npz",
            "types": images / "he_hgsc_nest_type_mask.npz", "region": [0.0, 0.5]}
    data = MaskTileDataset([spec], 64, scale=0.5, crops_per_image=8)
    image, inst, types = data.load(0)
    assert image.shape == (3, 750, 750) and inst.shape == types.shape == (750, 750)
    assert int(types.max()) == 3 and int(inst.max()) > 100
    for i in range(len(data)):
        crop, ci, ct = data[i]
        assert crop.shape == (3, 64, 64) and ci.shape == ct.shape == (64, 64)
    for i in range(len(data)):  # crops come from the left half only, and image and maps align
        y, x = data.crop_box(i)
        assert x + 64 <= 375
        crop, ci, _ = data[i]
        assert torch.equal(crop, image[:, y : y + 64, x : x + 64]) and torch.equal(ci, inst[y : y + 64, x : x + 64])
    with pytest.raises(ValueError, match="region"):
        MaskTileDataset([{**spec, "region": [0.8, 0.2]}], 64)


def test_synth_from_masks_writes_pairs_and_resumes(mask_pipe, tmp_path):
    import zarr

    from genpath.cli import app

    mask_pipe.save_pretrained(tmp_path / "model")
    inst, types = masks()
    big = torch.zeros(64, 64, dtype=torch.int64)
    big[:32, :32], big[40:50, 40:50] = inst[0], 7
    np.savez(tmp_path / "big.npz", instances=big.numpy(), types=(big > 0).numpy().astype(np.int32))
    runner = CliRunner()
    args = ["synth", "--model", str(tmp_path / "model"), "--masks", str(tmp_path / "big.npz"), "--tile", "32",
            "--steps", "1", "--n-per-condition", "2", "--out"]
    result = runner.invoke(app, [*args, str(tmp_path / "z")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "z" / "pairs.zarr"), mode="r")
    assert group["images"].shape == (4, 3, 32, 32)  # 2 tiles with nuclei (of 4) x 2 samples
    assert np.array_equal(group["instances"][0], big[:32, :32].numpy())
    rows = (tmp_path / "z" / "manifest.csv").read_text().splitlines()
    assert len(rows) == 5 and "big.npz@0,0" in rows[1]
    again = runner.invoke(app, [*args, str(tmp_path / "z")], catch_exceptions=False)  # resume: nothing to redo
    assert again.exit_code == 0 and (tmp_path / "z" / "manifest.csv").read_text().splitlines() == rows
    result = runner.invoke(app, [*args, str(tmp_path / "p"), "--format", "png"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 4
    saved = np.load(tmp_path / "p" / "masks" / "000000.npz")
    assert np.array_equal(saved["instances"], big[:32, :32].numpy())
    np.savez(tmp_path / "bad.npz", instances=np.zeros((32, 32), np.float32))
    bad = runner.invoke(app, ["synth", "--model", str(tmp_path / "model"), "--masks", str(tmp_path / "bad.npz"),
                              "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "integer label maps" in bad.output
