"""Published encoder presets against independent references built in exactly the published layout.

Each reference is written here, not taken from genpath: ``timm.create_model`` with the model
card's kwargs (depth 1, small widths), a hand-written transformers-``Dinov2Model``-layout module
(Phikon-v2; transformers is not installed) and a hand-written CONCH v1.5 tower. The weights are
saved as the hub stores them, loaded through ``create_encoder`` and compared on uint8 tiles with
the published preprocessing done here by hand (torchvision resize + centre crop, mean/std).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

timm = pytest.importorskip("timm")
TF = pytest.importorskip("torchvision.transforms.v2.functional")

from genpath.apps.embed_dataset import parse_encoder  # noqa: E402
from genpath.encoders import create_encoder  # noqa: E402
from genpath.encoders.reference import load_encoder_reference, save_encoder_reference  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
TINY = dict(depth=1, embed_dim=32, num_heads=2)
SWIGLU = dict(mlp_layer=timm.layers.SwiGLUPacked, act_layer=nn.SiLU)
# name: (timm architecture, the model card's create_model kwargs with img_size shrunk, mean/std, interpolation)
TIMM_CASES = {
    "uni": ("vit_large_patch16_224",
            dict(img_size=32, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True), IMAGENET,
            "bilinear"),
    "uni2-h": ("vit_giant_patch14_224",
               dict(img_size=28, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, **SWIGLU, reg_tokens=8,
                    dynamic_img_size=True), IMAGENET, "bilinear"),
    "virchow2": ("vit_huge_patch14_224",
                 dict(img_size=28, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
                      dynamic_img_size=True, **SWIGLU), IMAGENET, "bicubic"),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2",
                    dict(num_classes=0, img_size=28, global_pool="token", init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, "bilinear"),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2",
                    dict(num_classes=0, img_size=28, global_pool="token", init_values=1e-5, dynamic_img_size=False),
                    HOPTIMUS, "bilinear"),
}


def _tiles(seed: int = 0, height: int = 40, width: int = 34) -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, height, width), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _preprocess(images: torch.Tensor, size: int, interpolation: str, mean_std) -> torch.Tensor:
    """The published transform on tensors: Resize(size) (short side) + CenterCrop(size) + Normalize."""
    mode = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}[interpolation]
    x = TF.resize(images.float() / 255.0, size, interpolation=mode, antialias=True)
    x = TF.center_crop(x, [size, size]).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (layer scales too), so a misplaced tensor changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return module.eval()


def _timm_reference(name: str) -> tuple[nn.Module, dict]:
    arch, card, _, _ = TIMM_CASES[name]
    model = timm.create_model(arch, pretrained=False, **{**card, **TINY})
    return _randomize(model, seed=len(name)), {"img_size": card["img_size"], **TINY}


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_presets_match_the_model_card_call(tmp_path, name):
    model, overrides = _timm_reference(name)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    encoder = create_encoder(name, checkpoint_path=tmp_path / "pytorch_model.bin", **overrides)
    _, card, mean_std, interpolation = TIMM_CASES[name]
    images = _tiles()
    with torch.no_grad():
        pixels = _preprocess(images, card["img_size"], interpolation, mean_std)
        if name == "virchow2":  # the model card: class token ‖ mean of the patch tokens (tokens 1-4 are registers)
            tokens = model.forward_features(pixels)
            expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        else:
            expected = model(pixels)
        out = encoder(images)
    width = 2 * TINY["embed_dim"] if name == "virchow2" else TINY["embed_dim"]
    assert out.shape == (3, width) and encoder.embed_dim == width and encoder.input_size == card["img_size"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    grid = (card["img_size"] // (16 if name == "uni" else 14)) ** 2  # patch tokens only: CLS and registers dropped
    assert encoder.tokens(images).shape == (3, grid, TINY["embed_dim"])
    assert encoder.mean.flatten().tolist() == pytest.approx(mean_std[0])


def test_safetensors_files_load_like_pytorch_bins(tmp_path):
    from safetensors.torch import save_file

    model, overrides = _timm_reference("h-optimus-1")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    encoder = create_encoder("h-optimus-1", checkpoint_path=tmp_path / "model.safetensors", **overrides)
    with torch.no_grad():
        torch.testing.assert_close(encoder(_tiles(1)), model(_preprocess(_tiles(1), 28, "bilinear", HOPTIMUS)),
                                   atol=1e-5, rtol=0)


class _Module(nn.Module):
    """An attribute bag (the nesting gives the transformers key names)."""


def _dinov2_reference(hidden: int = 32, heads: int = 2, layers: int = 1, patch: int = 16, image: int = 32):
    """transformers' Dinov2Model, hand-written: same keys, same forward (pre-norm, layer scale, CLS after layernorm)."""
    model = _Module()
    model.embeddings = _Module()
    model.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
    model.embeddings.mask_token = nn.Parameter(torch.zeros(1, hidden))
    model.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + (image // patch) ** 2, hidden))
    model.embeddings.patch_embeddings = _Module()
    model.embeddings.patch_embeddings.projection = nn.Conv2d(3, hidden, patch, patch)
    model.encoder = _Module()
    model.encoder.layer = nn.ModuleList()
    for _ in range(layers):
        layer = _Module()
        layer.norm1, layer.norm2 = nn.LayerNorm(hidden, eps=1e-6), nn.LayerNorm(hidden, eps=1e-6)
        layer.attention = _Module()
        layer.attention.attention = _Module()
        for part in ("query", "key", "value"):
            setattr(layer.attention.attention, part, nn.Linear(hidden, hidden))
        layer.attention.output = _Module()
        layer.attention.output.dense = nn.Linear(hidden, hidden)
        layer.layer_scale1, layer.layer_scale2 = _Module(), _Module()
        layer.layer_scale1.lambda1 = nn.Parameter(torch.ones(hidden))
        layer.layer_scale2.lambda1 = nn.Parameter(torch.ones(hidden))
        layer.mlp = _Module()
        layer.mlp.fc1, layer.mlp.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        model.encoder.layer.append(layer)
    model.layernorm = nn.LayerNorm(hidden, eps=1e-6)

    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        emb = model.embeddings
        x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(len(x), -1, -1), x], dim=1) + emb.position_embeddings
        for layer in model.encoder.layer:
            h = layer.norm1(x)
            att = layer.attention.attention

            def split(t):
                return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

            q, k, v = split(att.query(h)), split(att.key(h)), split(att.value(h))
            probs = (q @ k.transpose(-1, -2) / math.sqrt(hidden // heads)).softmax(-1)
            context = (probs @ v).transpose(1, 2).reshape(x.shape)
            x = x + layer.layer_scale1.lambda1 * layer.attention.output.dense(context)
            x = x + layer.layer_scale2.lambda1 * layer.mlp.fc2(F.gelu(layer.mlp.fc1(layer.norm2(x))))
        return model.layernorm(x)[:, 0]  # last_hidden_state[:, 0, :]

    model.forward = forward
    return _randomize(model, seed=7)


def test_phikon_v2_converts_the_transformers_dinov2_layout(tmp_path):
    from safetensors.torch import save_file

    reference = _dinov2_reference()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "patch_size": 16, "image_size": 32, "layerscale_value": 1.0, "mlp_ratio": 4,
        "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False}))
    assert "encoder.layer.0.attention.attention.query.weight" in reference.state_dict()
    encoder = create_encoder("phikon-v2", checkpoint_path=tmp_path / "model.safetensors", img_size=32, **TINY)
    images = _tiles(2, 48, 36)
    with torch.no_grad():
        expected = reference.forward(_preprocess(images, 32, "bilinear", IMAGENET))
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=0)
    assert encoder.embed_dim == 32 and encoder.tokens(images).shape == (3, 4, 32)
    state = reference.state_dict()
    del state["embeddings.mask_token"]
    state["pooler.dense.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"Dinov2Model keys, got 1 missing \['embeddings.mask_token'\] and 1 "
                                         r"unexpected \['pooler.dense.weight'\]"):
        create_encoder("phikon-v2", checkpoint_path=tmp_path / "bad.safetensors", img_size=32, **TINY)


def _conch_reference(dim=32, heads=2, patch=16, build=32, pool_dim=24, pool_heads=2, ckpt_grid=3):
    """CONCH v1.5's tower as its loader defines it (iBOT ViT trunk, attentional pooler, LayerNorm), by hand."""
    tower = _Module()
    tower.trunk = trunk = _Module()
    trunk.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    trunk.pos_embed = nn.Parameter(torch.zeros(1, 1 + ckpt_grid ** 2, dim))  # the checkpoint's grid
    trunk.patch_embed = _Module()
    trunk.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
    block = _Module()
    block.norm1, block.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    block.attn = _Module()
    block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    block.ls1, block.ls2 = _Module(), _Module()
    block.ls1.gamma, block.ls2.gamma = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
    block.mlp = _Module()
    block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
    trunk.blocks = nn.ModuleList([block])
    trunk.norm = nn.LayerNorm(dim, eps=1e-6)
    tower.attn_pool_contrast = pool = _Module()
    pool.query = nn.Parameter(torch.zeros(1, pool_dim))
    pool.ln_k, pool.ln_q = nn.LayerNorm(dim), nn.LayerNorm(pool_dim)
    pool.to_q = nn.Linear(pool_dim, pool_dim, bias=False)
    pool.to_kv = nn.Linear(dim, 2 * pool_dim, bias=False)
    pool.to_out = nn.Linear(pool_dim, pool_dim, bias=False)
    tower.ln_contrast = nn.LayerNorm(pool_dim)
    _randomize(tower, seed=11)
    saved = {k: v.clone() for k, v in tower.state_dict().items()}
    # the loader resamples the checkpoint's position embedding to the trunk's 224-px (here `build`-px) grid
    pos = timm.layers.resample_abs_pos_embed(saved["trunk.pos_embed"], new_size=[build // patch] * 2,
                                             num_prefix_tokens=1, interpolation="bilinear", antialias=False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, h = x.shape[2], x.shape[3]
        t = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([trunk.cls_token.expand(len(t), -1, -1), t], dim=1)
        n = pos.shape[1] - 1
        if t.shape[1] - 1 == n and w == h:
            t = t + pos
        else:  # iBOT's interpolate_pos_encoding
            side = int(math.sqrt(n))
            w0, h0 = w // patch + 0.1, h // patch + 0.1
            grid = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                                 scale_factor=(w0 / side, h0 / side), mode="bicubic")
            t = t + torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
        for blk in trunk.blocks:
            b, n_tok, c = t.shape
            qkv = blk.attn.qkv(blk.norm1(t)).reshape(b, n_tok, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            att = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            t = t + blk.ls1.gamma * blk.attn.proj((att @ v).transpose(1, 2).reshape(b, n_tok, c))
            t = t + blk.ls2.gamma * blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(t))))
        t = pool.ln_k(trunk.norm(t))
        qq = pool.to_q(pool.ln_q(pool.query)).expand(len(t), -1, -1)
        kk, vv = pool.to_kv(t).chunk(2, dim=-1)

        def split(z):
            return z.reshape(z.shape[0], z.shape[1], pool_heads, -1).transpose(1, 2)

        sim = torch.einsum("bhid,bhjd->bhij", split(qq) * (pool_dim // pool_heads) ** -0.5, split(kk))
        out = (sim - sim.amax(-1, keepdim=True)).softmax(-1) @ split(vv)
        out = pool.to_out(out.transpose(1, 2).reshape(len(t), 1, pool_dim))
        return tower.ln_contrast(out[:, 0])

    return saved, forward


def test_conch_v15_vision_tower_without_its_package(tmp_path):
    state, forward = _conch_reference()
    torch.save(state, tmp_path / "pytorch_model_vision.bin")
    encoder = create_encoder("conch-v1.5", checkpoint_path=tmp_path / "pytorch_model_vision.bin", img_size=32,
                             input_size=64, embed_dim=32, depth=1, num_heads=2, pool_dim=24, pool_heads=2)
    images = _tiles(3, 80, 70)
    with torch.no_grad():
        expected = forward(_preprocess(images, 64, "bilinear", IMAGENET))
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=0)
    assert encoder.embed_dim == 24 and encoder.input_size == 64


def test_published_dimensions_of_the_full_size_recipes():
    """The recipes at full size (built on the meta device: no memory, no weights) give the published widths."""
    from genpath.encoders.layouts import ConchVisionTower
    from genpath.encoders.published import RECIPES, _layer

    published = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "h-optimus-1": 1536,
                 "phikon-v2": 1024, "conch-v1.5": 768}
    for name, dim in published.items():
        recipe = RECIPES[name]
        kwargs = {k: (_layer(v) if k in ("mlp_layer", "act_layer") else v) for k, v in recipe.kwargs.items()}
        with torch.device("meta"):
            if recipe.layout == "conch":
                model = ConchVisionTower(**kwargs)
            else:
                model = timm.create_model(recipe.arch, pretrained=False, **kwargs)
        width = model.num_features * (2 if recipe.pooling == "cls+mean" else 1)
        assert width == dim, name


def test_encoder_json_records_only_the_preset_name_weights_and_overrides(tmp_path):
    model, overrides = _timm_reference("uni2-h")
    folder = tmp_path / "pipeline"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_encoder_reference(folder, "uni2-h", {"checkpoint_path": folder / "pytorch_model.bin", **overrides})
    record = json.loads((folder / "encoder.json").read_text())
    assert record == {"name": "uni2-h", "kwargs": {"checkpoint_path": "pytorch_model.bin", **overrides}}
    direct = create_encoder("uni2-h", checkpoint_path=folder / "pytorch_model.bin", **overrides)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder_reference(folder)(_tiles()), direct(_tiles()))
    with pytest.raises(ValueError, match="encoder kwargs: expected JSON values.*mlp_layer"):
        save_encoder_reference(folder, "timm.vit_giant_patch14_224", {"checkpoint_path": "x.bin", **SWIGLU})


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "h-optimus-0", "h-optimus-1", "phikon-v2",
                                  "conch-v1.5"])
def test_cli_name_colon_path_names_the_checkpoint(name):
    spec = f"{name}:/models/{name}/weights.bin"
    assert parse_encoder(spec) == (name, {"checkpoint_path": f"/models/{name}/weights.bin"})


def test_cli_spec_builds_the_preset(tmp_path):
    model, overrides = _timm_reference("uni")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    name, kwargs = parse_encoder(f"uni:{tmp_path / 'pytorch_model.bin'}")
    encoder = create_encoder(name, **kwargs, **overrides)
    assert encoder.name == "uni" and encoder(_tiles()).shape == (3, 32)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model, overrides = _timm_reference("uni")
    state = model.state_dict()
    del state["blocks.0.ls1.gamma"]
    state["head.weight"] = torch.zeros(3, 32)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"got 1 missing \['blocks.0.ls1.gamma'\] and 1 unexpected \['head.weight'\]"):
        create_encoder("uni", checkpoint_path=tmp_path / "pytorch_model.bin", **overrides)
    torch.save(model.state_dict(), tmp_path / "ok.bin")
    with pytest.raises(ValueError, match=r"checkpoint_path: expected uni .* tensors shaped .*pos_embed"):
        create_encoder("uni", checkpoint_path=tmp_path / "ok.bin", **{**overrides, "img_size": 48})
    with pytest.raises(FileNotFoundError, match="checkpoint_path: expected a local MahmoodLab/UNI pytorch_model.bin"):
        create_encoder("uni", checkpoint_path=tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="never downloads"):
        create_encoder("virchow2")


def test_overrides_must_be_json_architecture_values(tmp_path):
    model, overrides = _timm_reference("virchow2")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="mlp_layer: expected architecture overrides only"):
        create_encoder("virchow2", checkpoint_path=tmp_path / "pytorch_model.bin", **overrides, **SWIGLU)
    with pytest.raises(ValueError, match="mean: expected architecture overrides only"):
        create_encoder("virchow2", checkpoint_path=tmp_path / "pytorch_model.bin", **overrides, mean=(0.5,) * 3)
    with pytest.raises(ValueError, match="depth: expected a JSON value"):
        create_encoder("virchow2", checkpoint_path=tmp_path / "pytorch_model.bin", **{**overrides, "depth": object()})
    with pytest.raises(ValueError, match="overrides: expected arguments vit_huge_patch14_224 accepts"):
        create_encoder("virchow2", checkpoint_path=tmp_path / "pytorch_model.bin", **overrides, no_such_arg=1)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"blocks.0.attn.qkv.weight": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights-only .*torch.load\(weights_only=True\) refuses .*open"):
        create_encoder("uni", checkpoint_path=tmp_path / "pytorch_model.bin", **TINY)
    with pytest.raises(ValueError, match="weights-only"):
        create_encoder("timm.vit_small_patch16_224", checkpoint_path=tmp_path / "pytorch_model.bin")
    assert not marker.exists()


def test_timm_family_normalization_is_explicit(tmp_path):
    """``timm.<arch>`` used to take mean/std from timm's hub tag (0.5 for vit_large_patch16_224); now ImageNet."""
    card = {k: v for k, v in TIMM_CASES["uni"][1].items() if k != "num_classes"}  # the family sets num_classes=0
    model = _randomize(timm.create_model("vit_large_patch16_224", num_classes=0, depth=1, **card), seed=5)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # full width: the family's embed_dim is a check
    generic = create_encoder("timm.vit_large_patch16_224", checkpoint_path=tmp_path / "pytorch_model.bin",
                             depth=1, **card)
    assert generic.mean.flatten().tolist() == pytest.approx(IMAGENET[0]) and generic.input_size == 32
    preset = create_encoder("uni", checkpoint_path=tmp_path / "pytorch_model.bin", depth=1, img_size=32)
    square = _tiles(4, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(generic(square), preset(square), atol=1e-5, rtol=0)
    old = create_encoder("timm.vit_large_patch16_224", checkpoint_path=tmp_path / "pytorch_model.bin",
                         normalization="timm", depth=1, **card)
    assert old.std.flatten().tolist() == pytest.approx([0.5] * 3)
    explicit = create_encoder("timm.vit_large_patch16_224", checkpoint_path=tmp_path / "pytorch_model.bin",
                              mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0), depth=1, **card)
    assert explicit.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="normalization: expected one of"):
        create_encoder("timm.vit_large_patch16_224", checkpoint_path=tmp_path / "pytorch_model.bin",
                       normalization="clip", depth=1, **card)
