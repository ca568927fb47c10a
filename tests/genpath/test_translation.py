"""H&E -> IHC translation: losses against known answers, networks, data layouts, DAB analysis, pipelines, CLI."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import UNet2DModel
from PIL import Image
from typer.testing import CliRunner

from genpath.cli import app
from genpath.models.vae import build_vae
from genpath.pipelines import Translator
from genpath.pipelines.image_translation import (
    GeneratorTranslationPipeline,
    GeneratorTranslationPipelineOutput,
    ImageTranslationPipeline,
    LatentTranslationPipeline,
    LatentTranslationPipelineOutput,
)
from genpath.pipelines.stain_transfer import stain_transfer_scheduler
from genpath.translation.data import ImagePair, PairedCropDataset, pairs_from_layout, split_by_patient
from genpath.translation.losses import (
    adaptive_supervised_patch_nce,
    asp_schedule,
    asp_weights,
    gaussian_pyramid_l1,
    lsgan_loss,
    patch_nce_loss,
)
from genpath.translation.networks import PatchDiscriminator, PatchSampler, ResnetTranslator
from genpath.translation.stains import (
    brown_share,
    dab_correlation,
    dab_density,
    dab_positive_fraction,
    looks_like_ihc,
    rgb_to_hdx,
)
from genpath.translation.translator import LooksLikeIHCWarning
from tests.conftest import ROOT, STAINS_A, concentrations, render

DEMO = ROOT / "samples" / "pairs" / "demo_he_ihc"


def hdx_render(h: torch.Tensor, dab: torch.Tensor) -> torch.Tensor:
    """Beer-Lambert IHC (log10 OD) from haematoxylin and DAB concentrations with scikit-image's HDX matrix."""
    from skimage.color import rgb_from_hdx

    conc = torch.stack([h, dab, torch.zeros_like(h)], 1)
    od = torch.einsum("bdhw,dc->bchw", conc, torch.tensor(rgb_from_hdx, dtype=torch.float32))
    return torch.pow(10.0, -od).clamp(0, 1)


# 1. losses -------------------------------------------------------------------------------------

def test_patch_nce_matches_the_closed_form():
    # two orthonormal patches, query == key: logits (1, 0)/tau on the diagonal/off it
    q = torch.eye(2)[None]
    tau = 0.5
    expected = math.log(1 + math.exp(-1 / tau))
    torch.testing.assert_close(patch_nce_loss(q, q, tau), torch.full((2,), expected))
    swapped = patch_nce_loss(q, q.flip(1), tau)  # positives are now orthogonal, negatives identical
    torch.testing.assert_close(swapped, torch.full((2,), math.log(1 + math.exp(1 / tau))))
    with pytest.raises(ValueError, match="query, key"):
        patch_nce_loss(q, torch.eye(3)[None])


def test_patch_nce_does_not_train_the_key():
    q = F.normalize(torch.randn(1, 4, 8), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1, 4, 8), dim=-1).requires_grad_()
    patch_nce_loss(q, k).sum().backward()
    assert q.grad is not None and k.grad is None


def test_asp_schedule_and_weights():
    assert asp_schedule(0.0) == 1.0 and asp_schedule(0.49) == 1.0 and asp_schedule(0.75) == 0.5
    assert asp_schedule(1.0) == 0.0 and asp_schedule(0.3, "linear") == pytest.approx(0.7)
    assert asp_schedule(0.5, "sigmoid") == pytest.approx(0.5) and asp_schedule(0.9, "zero") == 1.0
    s = torch.tensor([-0.5, 0.0, 0.5, 1.0])
    torch.testing.assert_close(asp_weights(s, progress=0.0), torch.ones(4))  # early: uniform
    late = asp_weights(s, progress=1.0, lookup="linear")  # late: proportional to max(s, 0), mean 1
    torch.testing.assert_close(late, torch.tensor([0.0, 0.0, 0.5, 1.0]) / 1.5 * 4)
    middle = asp_weights(s, progress=0.75)  # p = 0.5: half uniform, half lookup
    raw = 0.5 + 0.5 * torch.tensor([0.0, 0.0, 0.5, 1.0])
    torch.testing.assert_close(middle, raw / raw.mean())
    top = asp_weights(torch.tensor([0.0, 1.0]), 1.0, lookup="top")
    torch.testing.assert_close(top, torch.tensor([0.0, 2.0]))
    for lookup in ("bell", "uniform"):
        assert asp_weights(s, 1.0, lookup=lookup).mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lookup"):
        asp_weights(s, 1.0, lookup="cubic")
    with pytest.raises(ValueError, match="schedule"):
        asp_schedule(0.1, "step")


def test_asp_down_weights_disagreeing_patches_late_in_training():
    torch.manual_seed(0)
    k = F.normalize(torch.randn(1, 16, 8), dim=-1)
    q = k.clone()
    q[:, :8] = F.normalize(torch.randn(1, 8, 8), dim=-1)  # half the patches disagree (misaligned pair)
    plain = patch_nce_loss(q, k).mean()
    early = adaptive_supervised_patch_nce(q, k, progress=0.0)
    late = adaptive_supervised_patch_nce(q, k, progress=1.0)
    torch.testing.assert_close(early, plain)
    assert late < plain


def test_gaussian_pyramid_l1_known_answers():
    x = torch.rand(2, 3, 32, 32)
    assert gaussian_pyramid_l1(x, x).item() == 0.0
    torch.testing.assert_close(gaussian_pyramid_l1(x, x + 0.1, levels=3), torch.tensor(0.1), atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_pyramid_l1(x, x.flip(-1), levels=1), F.l1_loss(x, x.flip(-1)))
    # fine misalignment costs less at coarse levels: the multi-scale loss forgives it
    shifted = x.roll(1, -1)
    assert gaussian_pyramid_l1(x, shifted, 4, (0.0, 0.0, 0.0, 1.0)) < gaussian_pyramid_l1(x, shifted, 1)
    with pytest.raises(ValueError, match="target"):
        gaussian_pyramid_l1(x, x[:1])
    with pytest.raises(ValueError, match="weights"):
        gaussian_pyramid_l1(x, x, 2, (1.0,))


def test_lsgan_loss():
    assert lsgan_loss(torch.ones(3), True).item() == 0.0 and lsgan_loss(torch.ones(3), False).item() == 1.0


# 2. networks -----------------------------------------------------------------------------------

def test_networks_round_trip(tmp_path):
    torch.manual_seed(0)
    g = ResnetTranslator(base_channels=8, num_residual_blocks=1).eval()
    d = PatchDiscriminator(base_channels=8).eval()
    s = PatchSampler(in_channels=(3, 8, 16, 32), projection_dim=16).eval()
    x = torch.rand(2, 3, 32, 32)
    for model, name in ((g, "g"), (d, "d"), (s, "s")):
        model.save_pretrained(tmp_path / name)
    g2, d2 = ResnetTranslator.from_pretrained(tmp_path / "g").eval(), PatchDiscriminator.from_pretrained(tmp_path / "d")
    s2 = PatchSampler.from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(g2(x), g(x))
    torch.testing.assert_close(d2.eval()(x), d(x))
    feats = g.nce_features(x)
    assert [f.shape[1] for f in feats] == [3, 8, 16, 32]
    q, ids = s(feats, num_patches=10, generator=torch.Generator().manual_seed(0))
    q2, _ = s2(feats, patch_ids=ids)
    for a, b in zip(q, q2, strict=True):
        torch.testing.assert_close(a, b)
        assert a.shape == (2, 10, 16)
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 10))
    out = g(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        g(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="nce_layers"):
        ResnetTranslator(num_residual_blocks=1, nce_layers=(0, 9))


def test_resize_conv_upsampling_has_no_checkerboard(tmp_path):
    # A flat input keeps the interior of every feature map flat; stride-2 transposed convolutions
    # then stamp a period-2 pattern on it (uneven kernel overlap), resize-convolutions do not.
    torch.manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.6)
    transposed = ResnetTranslator(base_channels=8, num_residual_blocks=1).eval()
    resize = ResnetTranslator(base_channels=8, num_residual_blocks=1, upsampling="resize_conv").eval()
    with torch.no_grad():
        inner_t = transposed(flat)[..., 24:40, 24:40]
        inner_r = resize(flat)[..., 24:40, 24:40]
    assert (inner_t - inner_t.mean(dim=(-2, -1), keepdim=True)).abs().max() > 1e-3
    torch.testing.assert_close(inner_r, inner_r[..., :1, :1].expand_as(inner_r), atol=1e-5, rtol=0)
    resize.save_pretrained(tmp_path / "g")
    loaded = ResnetTranslator.from_pretrained(tmp_path / "g").eval()
    assert loaded.config.upsampling == "resize_conv"
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), resize(x))
    with pytest.raises(ValueError, match="upsampling"):
        ResnetTranslator(upsampling="bilinear")


# 3. data ---------------------------------------------------------------------------------------

def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_pair_layouts_bci_mist_csv(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for split in ("train", "test"):
        for name in ("1_a.png", "2_b.png"):
            _write(tmp_path / "bci" / "HE" / split / name, img)
            _write(tmp_path / "bci" / "IHC" / split / name, 255 - img)
    for split in ("train", "val"):
        _write(tmp_path / "mist" / "TrainValAB" / f"{split}A" / "p1_0_0.jpg", img)
        _write(tmp_path / "mist" / "TrainValAB" / f"{split}B" / "p1_0_0.jpg", img)
    bci = pairs_from_layout(tmp_path / "bci", "bci", "train", patient_pattern=r"^(\d+)_")
    assert [p.name for p in bci] == ["1_a.png", "2_b.png"] and [p.patient for p in bci] == ["1", "2"]
    assert len(pairs_from_layout(tmp_path / "bci", "bci", None)) == 4
    mist = pairs_from_layout(tmp_path / "mist", "mist", "val", patient_pattern=r"^([^_]+)_")
    assert len(mist) == 1 and mist[0].patient == "p1" and mist[0].ihc.parent.name == "valB"
    demo = pairs_from_layout(DEMO, "csv", "train")
    assert len(demo) == 3 and all(p.he.is_file() and p.ihc.is_file() for p in demo)
    assert [p.patient for p in pairs_from_layout(DEMO, "csv", "test")] == ["p3"]
    _write(tmp_path / "bad" / "HE" / "x.png", img)
    _write(tmp_path / "bad" / "IHC" / "y.png", img)
    with pytest.raises(ValueError, match="same file names"):
        pairs_from_layout(tmp_path / "bad", "bci")
    with pytest.raises(ValueError, match="layout"):
        pairs_from_layout(tmp_path, "anhir")
    with pytest.raises(FileNotFoundError, match="root"):
        pairs_from_layout(tmp_path / "missing", "mist")


def test_split_by_patient_keeps_patients_whole():
    pairs = [ImagePair(ROOT, ROOT, f"{i}.png", f"patient{i // 3}") for i in range(60)]
    train, test = split_by_patient(pairs, 0.3)
    assert len(train) + len(test) == 60 and test and train
    assert not {p.patient for p in train} & {p.patient for p in test}
    assert split_by_patient(pairs, 0.3) == (train, test)  # stable


def test_paired_crops_are_aligned_and_reproducible(tmp_path):
    rng = np.random.default_rng(1)
    he = rng.integers(0, 200, (64, 80, 3), dtype=np.uint8)
    _write(tmp_path / "he.png", he)
    _write(tmp_path / "ihc.png", 255 - he)  # a pixel-wise function of the H&E: crops must agree exactly
    data = PairedCropDataset([ImagePair(tmp_path / "he.png", tmp_path / "ihc.png", "x", "p")], 24, 6, seed=3)
    assert len(data) == 6
    for i in range(6):
        a, b = data[i]
        assert a.shape == (3, 24, 24) and a.dtype == torch.uint8 and torch.equal(b, 255 - a)
        assert torch.equal(data[i][0], a)
    half = PairedCropDataset(data.pairs, 24, 1, scale=0.5)
    assert half._read(tmp_path / "he.png").shape == (3, 32, 40)
    with pytest.raises(ValueError, match="size"):
        PairedCropDataset(data.pairs, 100)[0]


# 4. stains -------------------------------------------------------------------------------------

def test_hdx_deconvolution_recovers_rendered_dab():
    h = torch.full((1, 8, 8), 0.3)
    dab = torch.zeros(1, 8, 8)
    dab[:, :, :4] = 0.5
    rgb = hdx_render(h, dab)
    hdx = rgb_to_hdx(rgb)
    torch.testing.assert_close(hdx[:, 1], dab, atol=0.02, rtol=0)  # 8-bit quantization only
    torch.testing.assert_close(hdx[:, 0], h, atol=0.02, rtol=0)
    assert dab_positive_fraction(rgb).item() == pytest.approx(0.5)
    assert dab_positive_fraction((rgb * 255).round().to(torch.uint8), threshold=0.6).item() == 0.0
    assert dab_density(rgb).shape == (1, 1, 8, 8)


def test_dab_correlation_and_ihc_detection():
    g = torch.Generator().manual_seed(0)
    dab = F.interpolate(torch.rand(2, 1, 4, 4, generator=g), size=64, mode="bilinear")[:, 0]
    ihc = hdx_render(torch.full_like(dab, 0.2), dab)
    torch.testing.assert_close(dab_correlation(ihc, ihc, pool=8), torch.ones(2), atol=1e-4, rtol=0)
    inverted = hdx_render(torch.full_like(dab, 0.2), dab.amax() - dab)
    assert (dab_correlation(ihc, inverted, pool=8) < -0.9).all()
    assert torch.isnan(dab_correlation(torch.ones(1, 3, 16, 16), ihc[:1, :, :16, :16], pool=4)).all()
    he = render(concentrations(2), STAINS_A)
    dab_dominant = hdx_render(torch.full_like(dab, 0.2), 0.3 + 0.5 * dab)
    assert looks_like_ihc(dab_dominant).all() and not looks_like_ihc(he).any()
    assert brown_share(torch.ones(1, 3, 8, 8)).item() == 0.0


# 5. pipelines and the Translator ----------------------------------------------------------------

def tiny_latent_pipeline() -> LatentTranslationPipeline:
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    unet = UNet2DModel(sample_size=16, in_channels=8, out_channels=4, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=4)
    return LatentTranslationPipeline(vae=vae, unet=unet, scheduler=stain_transfer_scheduler())


@pytest.fixture(scope="module")
def translator_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("translators")
    tiny_latent_pipeline().save_pretrained(root / "diffusion")
    torch.manual_seed(0)
    GeneratorTranslationPipeline(translator=ResnetTranslator(base_channels=8, num_residual_blocks=1)).save_pretrained(
        root / "gan")
    return root


def test_latent_pipeline_round_trip_and_batch_invariance(translator_dirs):
    pipe = LatentTranslationPipeline.from_pretrained(translator_dirs / "diffusion")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.target_stain == "IHC" and pipe.size_multiple == 4
    x = render(concentrations(8, 32), STAINS_A)
    ref = tiny_latent_pipeline()
    ref.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipe(x[:2], num_inference_steps=2).images, ref(x[:2], num_inference_steps=2).images)
    full = pipe(x, num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images
    single = pipe(x[3:4], num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(full[3:4], single, atol=1e-5, rtol=0)
    assert not torch.allclose(pipe(x[:1], generator=torch.Generator().manual_seed(6)).images,
                              pipe(x[:1], generator=torch.Generator().manual_seed(5)).images)
    with pytest.raises(ValueError, match="divisible by 4"):
        pipe(x[:, :, :30])
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(x, num_inference_steps=0)


def test_translation_pipelines_outputs_and_one_loading_path(translator_dirs):
    x = render(concentrations(2, 32), STAINS_A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latent = ImageTranslationPipeline.from_pretrained(translator_dirs / "diffusion")
        gan = ImageTranslationPipeline.from_pretrained(translator_dirs / "gan")
    assert type(latent) is LatentTranslationPipeline and type(gan) is GeneratorTranslationPipeline
    out = latent(x, num_inference_steps=1)
    assert isinstance(out, LatentTranslationPipelineOutput)
    seeded = latent(x, num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(out.images, seeded)  # default generator: seed 0, deterministic
    (images,) = latent(x, num_inference_steps=1, return_dict=False)
    torch.testing.assert_close(images, out.images)
    one_step = gan(x)
    assert isinstance(one_step, GeneratorTranslationPipelineOutput)
    assert torch.equal(gan(x, return_dict=False)[0], one_step.images)
    with pytest.raises(ValueError, match="expected a checkpoint of LatentTranslationPipeline"):
        LatentTranslationPipeline.from_pretrained(translator_dirs / "gan")


def test_mismatched_translator_checkpoints_are_named(tmp_path, translator_dirs):
    pipe = tiny_latent_pipeline()
    pipe.unet = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                            layers_per_block=1, norm_num_groups=8)
    pipe.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="unet: expected in/out channels 8/4"):
        Translator(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="model"):
        Translator(tmp_path / "nothing")
    with pytest.raises(ValueError, match="num_inference_steps"):
        Translator(translator_dirs / "gan", num_inference_steps=0)


@pytest.mark.parametrize("kind", ["diffusion", "gan"])
def test_translator_keeps_the_tensor_contract_and_warns_on_ihc(translator_dirs, kind):
    translator = Translator(translator_dirs / kind, num_inference_steps=2)
    assert translator.kind == ("diffusion" if kind == "diffusion" else "generator")
    he = (render(concentrations(2, 40), STAINS_A)[:, :, :38, :37] * 255).round().to(torch.uint8)
    before = he.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LooksLikeIHCWarning)
        out = translator(he)
        single = translator(he[0].float() / 255)
    assert torch.equal(he, before)
    assert out.shape == he.shape and out.dtype == torch.uint8
    assert single.shape == (3, 38, 37) and single.dtype == torch.float32
    ihc = hdx_render(torch.full((1, 32, 32), 0.2), torch.full((1, 32, 32), 0.6))
    with pytest.warns(LooksLikeIHCWarning, match="images: expected H&E input"):
        translator(ihc)


# 6. training and CLI ---------------------------------------------------------------------------

def test_train_both_translators_and_translate_tiles_and_a_slide(tmp_path):
    runner = CliRunner()
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["translator"]
    tiny["data"]["pairs"]["root"] = str(DEMO)
    diffusion = {**tiny, "model": {"block_out_channels": [16, 32],
                                   "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                   "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
                                   "attention_head_dim": 4},
                 "options": {"kind": "diffusion", "vae": str(ROOT / "samples" / "checkpoints" / "vae_small")}}
    for kind, section in (("gan", tiny), ("diffusion", diffusion)):
        config = tmp_path / f"{kind}.yaml"
        config.write_text(yaml.safe_dump({"translator": section}))
        result = runner.invoke(app, ["train", "translator", "--config", str(config), "--output-dir",
                                     str(tmp_path / kind)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        log = [yaml.safe_load(line) for line in (tmp_path / kind / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
        if kind == "gan":
            assert {"d", "g_gan", "nce", "asp", "pyramid"} <= set(log[0])
        assert (tmp_path / kind / "samples" / "step-000002.png").is_file()
    # tiles: one bad file does not stop the others
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in (DEMO / "HE").glob("*.png"):
        (inputs / p.name).write_bytes(p.read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["translate", str(inputs), "--model", str(tmp_path / "diffusion" / "pipeline"),
                                 "--out", str(tmp_path / "tiles"), "--steps", "1"])
    assert result.exit_code == 1 and "broken.png" in result.output
    rows = {r["input"].split("/")[-1]: r for r in yaml.safe_load((tmp_path / "tiles" / "manifest.json").read_text())}
    assert rows["broken.png"]["status"] == "failed" and rows["demo_0.png"]["status"] == "translated"
    assert Image.open(tmp_path / "tiles" / "demo_0.png").size == (128, 128)
    # a slide, through the overlapping-window engine
    from genpath.io.slide import open_slide
    from genpath.io.synthetic_slide import write_synthetic_slide

    patches = np.stack([np.asarray(Image.open(DEMO / "HE" / f"demo_{i}.png").convert("RGB")) for i in range(4)])
    slide = write_synthetic_slide(tmp_path / "slide.tif", 320, 256, patches, kind="tiff", tile=128, seed=0,
                                  compression="zlib")
    result = runner.invoke(app, ["translate", str(slide), "--model", str(tmp_path / "gan" / "pipeline"),
                                 "--out", str(tmp_path / "slides"), "--tile-size", "128", "--overlap", "16"])
    assert result.exit_code == 0, result.output
    with open_slide(tmp_path / "slides" / "slide.tiff") as reader:
        assert reader.dimensions == (320, 256)
    assert "done" in (tmp_path / "slides" / "manifest.csv").read_text()
    bad = runner.invoke(app, ["translate", str(inputs), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "model" in bad.output


def test_bad_translator_configs_are_named(tmp_path):
    from genpath.training.configs import TrainConfig
    from genpath.training.translator import train_translator

    base = {"data": {"pairs": {"root": str(DEMO), "layout": "csv"}, "size": 32}, "train": {"max_steps": 1}}
    with pytest.raises(ValueError, match="options.kind"):
        train_translator(TrainConfig.from_dict({**base, "options": {"kind": "cyclegan"}}))
    with pytest.raises(ValueError, match="options: unknown keys"):
        train_translator(TrainConfig.from_dict({**base, "options": {"kind": "gan", "lambda_l1": 3}}))
    with pytest.raises(ValueError, match="options.vae"):
        train_translator(TrainConfig.from_dict({**base, "options": {"kind": "diffusion"}}))
    with pytest.raises(ValueError, match="data.pairs"):
        TrainConfig.from_dict({"data": {"pairs": {"layout": "csv"}}})
