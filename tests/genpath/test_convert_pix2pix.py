"""genpath convert pix2pix: published ResnetGenerator layouts (pix2pix/CycleGAN, CUT/ASP, BCI) -> genpath translate.

The reference modules below are a transcription of the published code (junyanz/pytorch-CycleGAN-and-pix2pix,
taesungp/contrastive-unpaired-translation, lifangda01/AdaptiveSupervisedPatchNCE, bupt-ai-cz/BCI
``models/networks.py``), independent of genpath's module: tiny widths, saved as the repositories save
(``torch.save(net.state_dict(), "latest_net_G.pth")``), converted through the CLI and compared with the
reference forward (``[-1, 1]`` in and out).
"""

import copy
import functools
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from genpath.cli import app
from genpath.pipelines import Translator
from genpath.pipelines.image_translation import GeneratorTranslationPipeline, ImageTranslationPipeline
from genpath.translation.convert_pix2pix import infer_layout, read_state_dict
from genpath.translation.resnet_generator import ResnetGenerator
from tests.conftest import ROOT, STAINS_A, concentrations, render

DEMO_HE = ROOT / "samples" / "pairs" / "demo_he_ihc" / "HE"
runner = CliRunner()


# reference: a transcription of the published networks.py ------------------------------------------

def get_filter(filt_size=3):
    a = {3: np.array([1.0, 2.0, 1.0]), 4: np.array([1.0, 3.0, 3.0, 1.0])}[filt_size]
    filt = torch.Tensor(a[:, None] * a[None, :])
    return filt / torch.sum(filt)


class RefDownsample(nn.Module):
    def __init__(self, channels, filt_size=3, stride=2):
        super().__init__()
        self.stride = stride
        pads = [int(1.0 * (filt_size - 1) / 2), int(np.ceil(1.0 * (filt_size - 1) / 2))] * 2
        self.register_buffer("filt", get_filter(filt_size)[None, None, :, :].repeat((channels, 1, 1, 1)))
        self.pad = nn.ReflectionPad2d(pads)

    def forward(self, inp):
        return F.conv2d(self.pad(inp), self.filt, stride=self.stride, groups=inp.shape[1])


class RefUpsample(nn.Module):
    def __init__(self, channels, filt_size=4, stride=2):
        super().__init__()
        self.filt_odd = np.mod(filt_size, 2) == 1
        self.pad_size = int((filt_size - 1) / 2)
        self.stride = stride
        self.register_buffer("filt", (get_filter(filt_size) * stride**2)[None, None, :, :].repeat((channels, 1, 1, 1)))
        self.pad = nn.ReplicationPad2d([1, 1, 1, 1])

    def forward(self, inp):
        ret = F.conv_transpose2d(self.pad(inp), self.filt, stride=self.stride, padding=1 + self.pad_size,
                                 groups=inp.shape[1])[:, :, 1:, 1:]
        return ret if self.filt_odd else ret[:, :, :-1, :-1]


def get_norm_layer(norm_type):
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)


class RefResnetBlock(nn.Module):
    def __init__(self, dim, norm_layer, use_dropout, use_bias, weight_norm):
        super().__init__()
        block = [nn.ReflectionPad2d(1), weight_norm(nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias)),
                 norm_layer(dim), nn.ReLU(True)]
        if use_dropout:
            block += [nn.Dropout(0.5)]
        block += [nn.ReflectionPad2d(1), weight_norm(nn.Conv2d(dim, dim, kernel_size=3, padding=0, bias=use_bias)),
                  norm_layer(dim)]
        self.conv_block = nn.Sequential(*block)

    def forward(self, x):
        return x + self.conv_block(x)


class RefResnetGenerator(nn.Module):
    """ResnetGenerator of CUT/ASP (pix2pix's is the no_antialias, no_antialias_up, no spectral case)."""

    def __init__(self, ngf=64, norm="instance", use_dropout=False, n_blocks=6, no_antialias=True,
                 no_antialias_up=True, spectral=False):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        use_bias = norm_layer.func == nn.InstanceNorm2d
        weight_norm = nn.utils.spectral_norm if spectral else (lambda x: x)
        model = [nn.ReflectionPad2d(3), weight_norm(nn.Conv2d(3, ngf, kernel_size=7, padding=0, bias=use_bias)),
                 norm_layer(ngf), nn.ReLU(True)]
        for i in range(2):
            mult = 2**i
            if no_antialias:
                model += [weight_norm(nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1,
                                                bias=use_bias)), norm_layer(ngf * mult * 2), nn.ReLU(True)]
            else:
                model += [weight_norm(nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=1, padding=1,
                                                bias=use_bias)), norm_layer(ngf * mult * 2), nn.ReLU(True),
                          RefDownsample(ngf * mult * 2)]
        for _ in range(n_blocks):
            model += [RefResnetBlock(ngf * 4, norm_layer, use_dropout, use_bias, weight_norm)]
        for i in range(2):
            mult = 2 ** (2 - i)
            if no_antialias_up:
                model += [weight_norm(nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2,
                                                         padding=1, output_padding=1, bias=use_bias)),
                          norm_layer(int(ngf * mult / 2)), nn.ReLU(True)]
            else:
                model += [RefUpsample(ngf * mult),
                          weight_norm(nn.Conv2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=1, padding=1,
                                                bias=use_bias)),
                          norm_layer(int(ngf * mult / 2)), nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3), weight_norm(nn.Conv2d(ngf, 3, kernel_size=7, padding=0)), nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, x):
        return self.model(x)


def reference(seed=0, train_steps=0, **kwargs):
    """A reference generator with weights large enough to make outputs vary (and trained u/v for spectral norm)."""
    torch.manual_seed(seed)
    net = RefResnetGenerator(**kwargs)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.3) + (1.0 if name.endswith("2.weight") else 0))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) * 2 + 0.5)
    if train_steps:  # power iterations move u/v away from their random start, as training does
        net.train()
        with torch.no_grad():
            for _ in range(train_steps):
                net(torch.rand(1, 3, 16, 16) * 2 - 1)
    return net.eval()


def save_published(net, folder, name="latest_net_G.pth"):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.cpu().state_dict(), folder / name)  # base_model.save_networks
    return folder / name


def ref_translate(net, x01):
    with torch.no_grad():
        return (net(x01 * 2 - 1) + 1) / 2


def convert(src, out, *flags):
    result = runner.invoke(app, ["convert", "pix2pix", str(src), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / "conversion.json").read_text())


def demo_tiles(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(DEMO_HE.glob("*.png"))[:1]:
        (inputs / p.name).write_bytes(p.read_bytes())
    return inputs


def translate_and_compare(net, model_dir, tmp_path, bci=False):
    """genpath translate tiles on the demo tiles vs the reference forward: mean |diff| <= 1/255."""
    inputs, out = demo_tiles(tmp_path), tmp_path / "translated"
    result = runner.invoke(app, ["translate", "tiles", str(inputs), "--model", str(model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for p in sorted(inputs.glob("*.png")):
        x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
        expected = ref_translate(net, x)
        got = torch.from_numpy(np.array(Image.open(out / p.name))).permute(2, 0, 1)[None].float() / 255
        assert got.shape == expected.shape
        assert (got - expected).abs().mean() <= 1 / 255
        assert expected.std() > 0.05  # a meaningful comparison, not a flat image


# 1. the published layouts convert and translate ------------------------------------------------

def test_pix2pix_9_block_instance_layout_keys_tiles_and_pipeline(tmp_path):
    net = reference(ngf=4, n_blocks=9)
    src = save_published(net, tmp_path / "horse2zebra")
    keys = set(torch.load(src, weights_only=True))
    assert {"model.1.weight", "model.1.bias", "model.10.conv_block.1.weight", "model.18.conv_block.5.weight",
            "model.19.weight", "model.22.weight", "model.26.bias"} <= keys
    record = convert(src, tmp_path / "g", "--n-blocks", "9", "--ngf", "4", "--norm", "instance", "--no-dropout",
                     "--no-antialias", "--no-spectral-norm")
    assert record["generator"] == {"ngf": 4, "n_blocks": 9, "n_downsampling": 2, "norm": "instance",
                                   "use_dropout": False, "antialias_down": False, "antialias_up": False,
                                   "batch_stats": False}
    assert len(record["sha256"]) == 64
    pipe = ImageTranslationPipeline.from_pretrained(tmp_path / "g")
    assert type(pipe) is GeneratorTranslationPipeline and isinstance(pipe.translator, ResnetGenerator)
    assert set(pipe.translator.state_dict()) == keys  # the published key layout, unchanged
    x = render(concentrations(3, 32), STAINS_A)
    torch.testing.assert_close(pipe(x).images, ref_translate(net, x), atol=1e-5, rtol=0)
    translate_and_compare(net, tmp_path / "g", tmp_path)


def test_cut_asp_layout_antialiasing_and_spectral_norm(tmp_path):
    net = reference(ngf=4, n_blocks=2, no_antialias=False, no_antialias_up=False, spectral=True, train_steps=3)
    src = save_published(net, tmp_path / "mist_her2_lambda_linear")
    sd = torch.load(src, weights_only=True)
    assert {"model.1.weight_orig", "model.1.weight_u", "model.1.weight_v", "model.7.filt", "model.11.filt",
            "model.14.filt", "model.15.weight_orig", "model.18.filt", "model.23.weight_orig"} <= set(sd)
    assert "model.1.weight" not in sd
    record = convert(src, tmp_path / "asp", "--preset", "asp", "--n-blocks", "2", "--ngf", "4")
    assert record["preset"] == "asp" and record["layout"]["spectral_norm"] is True
    assert record["generator"]["antialias_down"] and record["generator"]["antialias_up"]
    translator = Translator(tmp_path / "asp")
    x = render(concentrations(2, 32), STAINS_A)
    torch.testing.assert_close(translator(x), ref_translate(net, x), atol=1e-5, rtol=0)
    translate_and_compare(net, tmp_path / "asp", tmp_path)
    # a slide through the window engine
    from genpath.io.slide import open_slide
    from genpath.io.synthetic_slide import write_synthetic_slide

    patches = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(DEMO_HE.glob("*.png"))[:2]])
    slide = write_synthetic_slide(tmp_path / "slide.tif", 160, 96, patches, kind="tiff", tile=64, seed=0,
                                  compression="zlib")
    result = runner.invoke(app, ["translate", "slides", str(slide), "--model", str(tmp_path / "asp"), "--out",
                                 str(tmp_path / "slides"), "--tile-size", "64", "--overlap", "16"])
    assert result.exit_code == 0, result.output
    with open_slide(tmp_path / "slides" / "slide.tiff") as reader:
        assert reader.dimensions == (160, 96)


def test_spectral_norm_on_transposed_convolutions_is_folded_along_dim_1(tmp_path):
    # CUT with --no_antialias_up: ConvTranspose2d under spectral norm (torch uses dim=1 for them)
    net = reference(ngf=4, n_blocks=1, no_antialias=False, no_antialias_up=True, spectral=True, train_steps=3)
    src = save_published(net, tmp_path / "cut")
    assert torch.load(src, weights_only=True)["model.13.weight_u"].shape == (8,)  # out channels of 16 -> 8
    record = convert(src, tmp_path / "g")  # everything read from the file
    assert record["generator"]["antialias_down"] and not record["generator"]["antialias_up"]
    pipe = GeneratorTranslationPipeline.from_pretrained(tmp_path / "g")
    x = render(concentrations(2, 32), STAINS_A)
    torch.testing.assert_close(pipe(x).images, ref_translate(net, x), atol=1e-5, rtol=0)
    bad = runner.invoke(app, ["convert", "pix2pix", str(src), "--out", str(tmp_path / "h"), "--antialias"])
    assert bad.exit_code == 2 and "--antialias: expected neither flag" in bad.output


def test_bci_batch_norm_dropout_and_batch_statistics(tmp_path):
    net = reference(ngf=4, n_blocks=2, norm="batch", use_dropout=True)
    src = save_published(net, tmp_path / "pyramidpix2pix")
    keys = set(torch.load(src, weights_only=True))
    # dropout shifts the second block convolution from 5 to 6 (and its norm from 6 to 7)
    assert {"model.10.conv_block.6.weight", "model.10.conv_block.7.running_var"} <= keys
    assert not any(".conv_block.5." in k for k in keys) and "model.1.bias" not in keys
    record = convert(src, tmp_path / "bci", "--preset", "bci", "--n-blocks", "2", "--ngf", "4")
    assert record["generator"]["batch_stats"] and record["generator"]["use_dropout"]
    x = render(concentrations(3, 32), STAINS_A)
    # BCI's test.py: no --eval, batch size 1, so the batch norms use each image's statistics (dropout left off:
    # genpath is deterministic)
    with_running_stats = ref_translate(net, x)
    test_mode = copy.deepcopy(net).train()  # train mode also moves the running statistics: use a copy
    for m in test_mode.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    expected = torch.cat([ref_translate(test_mode, x[i:i + 1]) for i in range(3)])
    pipe = ImageTranslationPipeline.from_pretrained(tmp_path / "bci")
    torch.testing.assert_close(pipe(x).images, expected, atol=1e-5, rtol=0)  # batch-invariant, per image
    buffers = {k: v.clone() for k, v in pipe.translator.state_dict().items() if "running" in k}
    assert all(torch.equal(v, pipe.translator.state_dict()[k]) for k, v in buffers.items())  # never updated
    # the switch off: running statistics (eval mode)
    convert(src, tmp_path / "eval", "--preset", "bci", "--n-blocks", "2", "--ngf", "4", "--no-batch-stats")
    plain = ImageTranslationPipeline.from_pretrained(tmp_path / "eval")
    torch.testing.assert_close(plain(x).images, with_running_stats, atol=1e-5, rtol=0)
    assert (plain(x).images - expected).abs().mean() > 1e-3
    wrong = runner.invoke(app, ["convert", "pix2pix", str(src), "--out", str(tmp_path / "w"), "--no-dropout"])
    assert wrong.exit_code == 2 and "--dropout: expected dropout (the second block convolution at conv_block.6)" \
        in wrong.output


# 2. reading files -------------------------------------------------------------------------------

def test_wrappers_prefixes_safetensors_and_old_instance_norm_statistics(tmp_path):
    from safetensors.torch import save_file

    net = reference(ngf=4, n_blocks=1)
    sd = net.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    assert set(read_state_dict(tmp_path / "wrapped.pth")) == set(sd)
    save_file(dict(sd), str(tmp_path / "g.safetensors"))
    convert(tmp_path / "g.safetensors", tmp_path / "st")
    # pre-0.4 InstanceNorm checkpoints carry running statistics that the published loader drops
    old = dict(sd, **{"model.2.running_mean": torch.zeros(4), "model.2.running_var": torch.ones(4)})
    torch.save(old, tmp_path / "old.pth")
    convert(tmp_path / "old.pth", tmp_path / "old")
    assert infer_layout(sd).norm == "instance" and infer_layout(old).norm == "instance"


def test_a_code_executing_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"model.1.weight": Payload()}, tmp_path / "evil.pth")
    result = runner.invoke(app, ["convert", "pix2pix", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "weights-only" in result.output and "never unpickles" in result.output
    assert not marker.exists() and not (tmp_path / "o").exists()


# 3. hostile inputs: exit code 2, one line naming the flag -------------------------------------------

@pytest.fixture(scope="module")
def plain_pth(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    src = save_published(reference(ngf=4, n_blocks=2), root / "ok")
    sd = torch.load(src, weights_only=True)
    torch.save({**sd, "model.1.weight": torch.full_like(sd["model.1.weight"], float("nan"))}, root / "nan.pth")
    torch.save({k: v for k, v in sd.items() if k != "model.11.conv_block.5.weight"}, root / "missing.pth")
    torch.save({**sd, "netF.0.weight": torch.zeros(1)}, root / "extra.pth")
    torch.save({"model.model.0.weight": torch.zeros(4, 3, 4, 4)}, root / "unet.pth")
    (root / "text.pth").write_text("not a checkpoint")
    (root / "a_file").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    return root


HOSTILE = [
    (["missing_file.pth"], "src: expected a generator checkpoint file (.pth)"),
    (["ok"], "(a folder)"),
    (["text.pth"], "expected a weights-only PyTorch state dict"),
    (["ok/latest_net_G.pth", "--n-blocks", "9"], "--n-blocks: expected 2 (the file holds 2 resnet blocks"),
    (["ok/latest_net_G.pth", "--ngf", "64"], "--ngf: expected 4 (the stem convolution model.1 has 4 output"),
    (["ok/latest_net_G.pth", "--norm", "batch"], "--norm: expected 'instance'"),
    (["ok/latest_net_G.pth", "--norm", "group"], "--norm: expected one of ('batch', 'instance', 'none')"),
    (["ok/latest_net_G.pth", "--spectral-norm"], "--spectral-norm: expected no spectral norm"),
    (["ok/latest_net_G.pth", "--antialias"], "--antialias: expected no anti-aliasing"),
    (["ok/latest_net_G.pth", "--dropout"], "--dropout: expected no dropout"),
    (["ok/latest_net_G.pth", "--batch-stats"], "--batch-stats: expected a batch-norm generator, got norm 'instance'"),
    (["ok/latest_net_G.pth", "--preset", "bci"], "--ngf: expected 4 (the stem convolution model.1 has 4 output "
                                                 "channels) for latest_net_G.pth, got --ngf 64 (from --preset bci)"),
    (["ok/latest_net_G.pth", "--preset", "cyclegan"], "--preset: expected one of ['asp', 'bci']"),
    (["nan.pth"], "src: expected finite weights in nan.pth, got NaN or infinite values in [model.1.weight]"),
    (["missing.pth"], "1 missing [model.11.conv_block.5.weight] and 0 unexpected"),
    (["extra.pth"], "0 missing [] and 1 unexpected [netF.0.weight]"),
    (["unet.pth"], "got a UnetGenerator (netG unet_256/unet_128"),
]


@pytest.mark.parametrize(("args", "message"), HOSTILE, ids=[" ".join(a) for a, _ in HOSTILE])
def test_hostile_inputs_are_one_line_errors(plain_pth, tmp_path, args, message):
    src, *flags = args
    result = runner.invoke(app, ["convert", "pix2pix", str(plain_pth / src), "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("out", "message"), [("a_file", "out: expected an output folder, got the existing file"),
                                              ("full", "out: expected a new or empty folder")])
def test_bad_out_folders_are_refused(plain_pth, out, message):
    result = runner.invoke(app, ["convert", "pix2pix", str(plain_pth / "ok" / "latest_net_G.pth"), "--out",
                                 str(plain_pth / out)])
    assert result.exit_code == 2 and message in result.output
    assert (plain_pth / "full" / "keep.txt").exists()


def test_convert_help_lists_the_families():
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0 and "pix2pix" in result.output and "CUT" in result.output
    assert "convert" in runner.invoke(app, ["--help"]).output


def test_convert_help_names_every_published_family():
    from genpath.cli.convert import LOADED_DIRECTLY
    from genpath.encoders.published import RECIPES

    result = runner.invoke(app, ["convert", "--help"], terminal_width=400)
    assert result.exit_code == 0 and "pix2pix" in result.output
    for name in RECIPES:  # every encoder preset is named
        assert name in LOADED_DIRECTLY, name
    assert "histaug" in LOADED_DIRECTLY and "Loaded directly" in result.output
