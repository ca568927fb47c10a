"""Official HistAug releases: the published layout loads, matches a reference forward, runs in the transform.

The reference below is an independent transcription of the published ``HistaugModel`` forward
(MICS-Lab/HistAug ``src/histaug/models/histaug_model.py``, wrapped as on the Hub by
``HistaugPretrainedModel.histaug``): timm's ``Mlp`` and an explicit softmax attention, small widths,
depth 1. Folders are written the way ``save_pretrained`` writes them: ``config.json`` with
``model_type: "histaug"`` and weights keyed ``histaug.*``.
"""

import json
import math
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import Mlp
from torch import nn

import augment
from augment.feature import HistAugCollate, HistAugTransform, load_histaug
from augment.functional import AUGMENTATION_ORDER, dihedral
from augment.histaug import HistAugModel
from augment.histaug_official import OFFICIAL_TRANSFORMS, OfficialHistAugModel
from augment.histaug_translate import TRANSLATION_ORDER, to_official_params
from tests.conftest import ROOT

DIM, CHUNKS, HEADS = 32, 4, 2
PARAMETERS = {"rotation": 0.75, "h_flip": 0.75, "v_flip": 0.75, "erosion": 0.75, "dilation": 0.75, "crop": 0.75,
              "gaussian_blur": 0.75, "hed": [-0.5, 0.5], "hue": [-0.5, 0.5], "brightness": [-0.5, 0.5],
              "contrast": [-0.5, 0.5], "saturation": [-0.5, 0.5], "gamma": [-0.5, 0.5]}
DISCRETE = {"rotation": 4, "h_flip": 2, "v_flip": 2, "gaussian_blur": 2, "erosion": 2, "dilation": 2, "crop": 6}


# -- the independent reference (published layout) ------------------------------------------------


def sinusoidal(n: int, dim: int) -> torch.Tensor:
    pe = torch.zeros(n, dim)
    for pos in range(n):
        for i in range(0, dim, 2):
            angle = pos / 10000 ** (i / dim)
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return pe


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, 2 * dim, bias=True)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, z):
        b, n1, c = x.shape
        q = self.q(x).reshape(b, n1, self.num_heads, self.head_dim).swapaxes(1, 2)
        k, v = self.kv(z).reshape(b, z.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n1, c))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.x_norm, self.z_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=0.0)

    def forward(self, x, z):
        x = x + self.attn(self.x_norm(x), self.z_norm(z))
        return x + self.mlp(self.norm2(x))


class HistaugModel(nn.Module):
    def __init__(self, input_dim, depth, num_heads, mlp_ratio, use_transform_pos_embeddings=True,
                 positional_encoding_type="learnable", final_activation="Identity", chunk_size=16, transforms=None,
                 **kwargs):
        super().__init__()
        self.chunk_size, self.embed_dim = chunk_size, input_dim // chunk_size
        self.use_transform_pos_embeddings, self.positional_encoding_type = (use_transform_pos_embeddings,
                                                                            positional_encoding_type)
        params = transforms["parameters"]
        self.register_buffer("chunk_pos_embeddings_buffer", sinusoidal(chunk_size, self.embed_dim))
        if use_transform_pos_embeddings and positional_encoding_type == "learnable":
            self.sequence_pos_embedding = nn.Embedding(len(params), self.embed_dim)
        elif use_transform_pos_embeddings:
            self.register_buffer("sequence_pos_embedding", sinusoidal(len(params), self.embed_dim))
        self.transform_embeddings = nn.ModuleDict()
        for name in params:
            if name in DISCRETE:
                self.transform_embeddings[name] = nn.Embedding(DISCRETE[name], self.embed_dim)
            else:
                self.transform_embeddings[name] = nn.Sequential(
                    nn.Linear(1, self.embed_dim * 2), nn.SiLU(), nn.Linear(self.embed_dim * 2, self.embed_dim))
        self.features_embed = nn.Sequential(nn.Linear(input_dim, self.embed_dim), nn.LayerNorm(self.embed_dim))
        self.blocks = nn.ModuleList([Block(self.embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(self.embed_dim)
        self.final_activation = getattr(nn, final_activation)()
        self.head = nn.Sequential(nn.Linear(input_dim, input_dim), self.final_activation)

    def forward(self, x, aug_params):
        x = x[:, None, :].view(x.shape[0], self.chunk_size, self.embed_dim) + self.chunk_pos_embeddings_buffer[None]
        tokens = []
        for name, (value, pos) in aug_params.items():
            if name in DISCRETE:
                token = self.transform_embeddings[name](value)
            else:
                token = self.transform_embeddings[name](value[..., None].float())
            if self.use_transform_pos_embeddings:
                table = self.sequence_pos_embedding
                token = token + (table(torch.as_tensor(pos)) if isinstance(table, nn.Embedding) else table[pos])
            tokens.append(token)
        z = torch.stack(tokens, dim=1)
        for block in self.blocks:
            x = block(x, z)
        x = self.head(self.norm(x).view(x.shape[0], 1, -1))
        return x[:, 0, :]


class HistaugPretrainedModel(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.histaug = HistaugModel(**config)

    def forward(self, x, aug_params):
        return self.histaug(x, aug_params)


def hub_config(**overrides) -> dict:
    config = {"architectures": ["HistaugPretrainedModel"],
              "auto_map": {"AutoConfig": "configuration_histaug.HistaugConfig",
                           "AutoModel": "modeling_histaug.HistaugPretrainedModel"},
              "model_type": "histaug", "torch_dtype": "float32", "transformers_version": "4.55.2",
              "input_dim": DIM, "depth": 1, "num_heads": HEADS, "mlp_ratio": 4.0,
              "use_transform_pos_embeddings": True, "positional_encoding_type": "learnable",
              "final_activation": "Identity", "embedding_type": "linear", "chunk_size": CHUNKS,
              "transforms": {"transform_class": "PatchAugmentation", "parameters": dict(PARAMETERS)}}
    config.update(overrides)
    return config


def reference(config: dict) -> HistaugPretrainedModel:
    torch.manual_seed(0)
    keys = ("input_dim", "depth", "num_heads", "mlp_ratio", "use_transform_pos_embeddings",
            "positional_encoding_type", "final_activation", "chunk_size", "transforms")
    model = HistaugPretrainedModel(**{k: config[k] for k in keys if k in config})
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))  # LayerNorms and biases away from 1/0: all weights matter
    return model.eval()


def write_release(folder, config: dict, model: nn.Module, fmt: str = "safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def release(tmp_path):
    config = hub_config()
    ref = reference(config)
    return write_release(tmp_path / "histaug-uni", config, ref), ref


def draw(model: OfficialHistAugModel, n: int, mode: str, seed: int = 0):
    return model.sample_aug_params(n, mode=mode, generator=torch.Generator().manual_seed(seed))


# -- loading and forward -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_official_folder_loads_strictly_and_matches_the_reference(tmp_path, fmt):
    config = hub_config()
    ref = reference(config)
    assert all(k.startswith("histaug.") for k in ref.state_dict())
    model = augment.load_histaug(write_release(tmp_path / "release", config, ref, fmt))
    assert isinstance(model, OfficialHistAugModel) and not model.training
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1))
    for mode in ("wsi_wise", "instance_wise"):
        params = draw(model, 64, mode)
        with torch.no_grad():
            expected = ref(x, params)
        assert (model(x, params) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("overrides", [
    {"positional_encoding_type": "sinusoidal", "final_activation": "Tanh"},
    {"use_transform_pos_embeddings": False, "depth": 2},
])
def test_config_variants_match_the_reference(tmp_path, overrides):
    config = hub_config(**overrides)
    ref = reference(config)
    model = load_histaug(write_release(tmp_path / "release", config, ref))
    x = torch.randn(16, DIM)
    params = draw(model, 16, "instance_wise", seed=3)
    with torch.no_grad():
        assert (model(x, params) - ref(x, params)).abs().max() < 1e-5


def test_keys_left_at_their_default_are_read_with_the_published_defaults(tmp_path):
    """transformers omits keys equal to HistaugConfig's defaults (input_dim 512, chunk_size 16, ...)."""
    config = hub_config(input_dim=512, chunk_size=16, num_heads=8)
    ref = reference(config)
    for key in ("input_dim", "chunk_size", "num_heads", "mlp_ratio", "final_activation", "embedding_type",
                "use_transform_pos_embeddings", "positional_encoding_type"):
        del config[key]
    model = load_histaug(write_release(tmp_path / "release", config, ref))
    assert model.input_dim == 512 and model.embed_dim == 32
    x, params = torch.randn(4, 512), draw(model, 4, "wsi_wise")
    with torch.no_grad():
        assert (model(x, params) - ref(x, params)).abs().max() < 1e-5


def test_genpaths_own_folders_still_load():
    assert isinstance(augment.load_histaug(ROOT / "samples" / "checkpoints" / "histaug_small"), HistAugModel)


# -- strictness and the trust boundary -----------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed(release, tmp_path):
    folder, ref = release
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del state["histaug.head.0.bias"]
    state["histaug.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['head.0.bias'\], unexpected keys \['extra.weight'\]"):
        load_histaug(folder)


def test_wrong_shapes_and_wrong_configs_are_one_line_errors(release):
    folder, _ = release
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mlp_ratio": 2.0}))
    with pytest.raises(ValueError, match=r"wrong shapes \['blocks.0.mlp.fc1.weight \(32, 8\) \(expected \(16, 8\)\)"):
        load_histaug(folder)
    for bad, match in [({"chunk_size": 5}, "chunk_size"), ({"final_activation": "Dropout"}, "final_activation"),
                       ({"transforms": {"parameters": {"warp": 0.5}}}, "transforms"), ({"depth": "1"}, "depth")]:
        (folder / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ValueError, match=match) as error:
            load_histaug(folder)
        assert "\n" not in str(error.value)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_code_executing_pickle_does_not_run(tmp_path):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(str(live))))
    assert live.exists()  # the payload is real: unpickling it runs code
    marker = tmp_path / "pwned"
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub_config()))
    torch.save({"histaug.head.0.bias": _Payload(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        augment.load_histaug(folder)
    assert not marker.exists()


def test_bad_inputs_are_refused(release):
    model = load_histaug(release[0])
    params = draw(model, 3, "wsi_wise")
    with pytest.raises(ValueError, match="features"):
        model(torch.randn(3, 2, DIM), params)
    with pytest.raises(ValueError, match=r"missing \['hue'\]"):
        model(torch.randn(3, DIM), {k: v for k, v in params.items() if k != "hue"})
    with pytest.raises(ValueError, match="rotation"):
        model(torch.randn(3, DIM), {**params, "rotation": (torch.full((3,), 4), params["rotation"][1])})


# -- sampling as published -----------------------------------------------------------------------


def test_wsi_wise_draws_are_identical_across_patches_and_instance_wise_differ(release):
    model = load_histaug(release[0])
    wsi = draw(model, 256, "wsi_wise")
    assert sorted(wsi) == sorted(PARAMETERS)
    assert all(bool((v == v[0]).all()) and bool((p == p[0]).all()) for v, p in wsi.values())
    inst = draw(model, 256, "instance_wise")
    assert all(len(v.unique()) > 1 for v, _ in inst.values())
    positions = torch.stack([p for _, p in inst.values()], 1)
    assert torch.equal(positions.sort(1).values, torch.arange(13).expand(256, -1))  # a permutation per row
    assert len({tuple(row) for row in positions.tolist()}) > 200
    dtypes = {k: v.dtype for k, (v, _) in inst.items()}
    assert dtypes["rotation"] == dtypes["crop"] == torch.int64 and dtypes["h_flip"] == torch.int32
    assert dtypes["hue"] == torch.float32 and inst["hue"][0].abs().max() <= 0.5
    assert inst["rotation"][0].max() == 3 and inst["crop"][0].max() == 4  # published ranges 0..3 and 0..4
    x = torch.randn(256, DIM)
    out = model(x, wsi)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_a_partial_config_samples_the_missing_transforms_as_zeros_at_the_tail(tmp_path):
    config = hub_config(transforms={"parameters": {"hue": [-0.1, 0.1], "rotation": 1.0}})
    ref = reference(config)
    model = load_histaug(write_release(tmp_path / "release", config, ref))
    params = draw(model, 8, "instance_wise")
    assert sorted(params) == sorted(OFFICIAL_TRANSFORMS)
    assert params["h_flip"][0].eq(0).all() and params["h_flip"][1].ge(2).all()
    x = torch.randn(8, DIM)
    with torch.no_grad():
        expected = ref(x, {k: params[k] for k in ("hue", "rotation")})
    assert (model(x, params) - expected).abs().max() < 1e-5  # the zero-filled extras change nothing
    with pytest.raises(ValueError, match="not trained on 'h_flip'"):
        model(x, {**params, "h_flip": (torch.ones(8, dtype=torch.int32), params["h_flip"][1])})


# -- the bag transform ---------------------------------------------------------------------------


def test_histaug_transform_runs_an_official_folder_as_the_reference(release):
    folder, ref = release
    transform = HistAugTransform(folder, p=1.0, mode="wsi")
    assert isinstance(transform.model, OfficialHistAugModel)
    bags = torch.randn(2, 5, DIM, dtype=torch.float64)
    out = transform(bags, generator=torch.Generator().manual_seed(7))
    assert out.shape == bags.shape and out.dtype == torch.float64
    g = torch.Generator().manual_seed(7)
    torch.rand(2, generator=g)  # the transform's draw of which bags to augment
    for b in range(2):
        params = transform.model.sample_aug_params(5, mode="wsi_wise", generator=g)
        with torch.no_grad():
            expected = ref(bags[b].float(), params)
        assert (out[b].float() - expected).abs().max() < 1e-5
    assert torch.equal(HistAugTransform(folder, p=0.0)(bags), bags)
    one = HistAugTransform(folder, p=1.0, mode="instance_wise")(bags[0])
    assert one.shape == (5, DIM)


def test_histaug_collate_works_with_an_official_model(release):
    collate = HistAugCollate(HistAugTransform(release[0], p=1.0))
    bags, labels = collate([(torch.randn(3, DIM), 0), (torch.randn(6, DIM), 1)])
    assert [b.shape for b in bags] == [(3, DIM), (6, DIM)] and labels.tolist() == [0, 1]


# -- genpath's schema -> the official dictionary -------------------------------------------------


def test_the_translation_table_on_known_values():
    params = {"brightness": torch.tensor([1.2, 1.0, 0.7]), "contrast": torch.tensor([0.8, 1.0, 1.5]),
              "saturation": torch.tensor([1.1, 1.0, 1.0]), "gamma": torch.tensor([1.3, 1.0, 0.6]),
              "hue": torch.tensor([-0.05, 0.0, 0.25]), "dihedral": torch.tensor([5.0, 3.0, 4.0]),
              "morphology": torch.tensor([-2.0, 0.0, 1.0]), "blur_sigma": torch.tensor([0.7, 0.0, 2.0]),
              "crop_scale": torch.tensor([1.0]), "crop_center": torch.tensor([[0.2, 0.9]]),
              "hed_shift": torch.zeros(1, 3), "hed_scale": torch.ones(1, 3)}
    out = to_official_params(params)
    got = {k: v.tolist() for k, (v, _) in out.items()}
    assert got["brightness"] == pytest.approx([0.2, 0.0, -0.3]) and got["contrast"] == pytest.approx([-0.2, 0, 0.5])
    assert got["saturation"] == pytest.approx([0.1, 0, 0]) and got["gamma"] == pytest.approx([0.3, 0, -0.4])
    assert got["hue"] == pytest.approx([-0.05, 0, 0.25])
    assert got["rotation"] == [1, 3, 0] and got["h_flip"] == [1, 0, 1] and got["v_flip"] == [0, 0, 0]
    assert got["erosion"] == [1, 0, 0] and got["dilation"] == [0, 0, 1] and got["gaussian_blur"] == [1, 0, 1]
    assert got["crop"] == [0, 0, 0] and got["hed"] == [0, 0, 0]
    positions = {k: p[0].item() for k, (_, p) in out.items()}
    assert sorted(positions.values()) == list(range(13))
    assert positions["crop"] < positions["rotation"] < positions["h_flip"] < positions["erosion"] < positions["hue"]


def test_the_translation_order_follows_genpaths_order_of_application():
    official = {"crop_scale": "crop", "dihedral": "rotation", "morphology": "erosion", "blur_sigma": "gaussian_blur",
                "brightness": "brightness", "contrast": "contrast", "saturation": "saturation", "hue": "hue",
                "gamma": "gamma", "hed_shift": "hed"}
    ranks = [TRANSLATION_ORDER.index(official[k]) for k in AUGMENTATION_ORDER]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("k", range(8))
def test_dihedral_as_rotation_then_flip_is_genpaths_dihedral(k):
    image = torch.rand(1, 3, 5, 5)
    out = to_official_params({"dihedral": torch.tensor([float(k)])})
    steps = sorted(("rotation", "h_flip", "v_flip"), key=lambda n: out[n][1].item())
    x = image
    for name in steps:  # the official transform applies them in position order
        value = out[name][0].item()
        if name == "rotation":
            x = torch.rot90(x, value, dims=[-2, -1])
        elif value:
            x = x.flip(-1) if name == "h_flip" else x.flip(-2)
    assert torch.equal(x, dihedral(image, torch.tensor([k])))


@pytest.mark.parametrize("params, match", [
    ({"hed_shift": torch.tensor([[0.01, 0.0, 0.0]])}, "hed_shift"),
    ({"hed_scale": torch.tensor([[1.1, 1.0, 1.0]])}, "hed_scale"),
    ({"crop_scale": torch.tensor([0.6])}, "crop_scale"),
    ({"lab_mean": torch.zeros(1, 3)}, "lab_mean"),
    ({"brightness": torch.tensor([1.8])}, "trained range"),
    ({"warp": torch.tensor([1.0])}, "expected keys"),
])
def test_the_translation_refuses_what_has_no_equivalent(params, match):
    with pytest.raises(ValueError, match=match) as error:
        to_official_params(params)
    assert "\n" not in str(error.value)


def test_translated_params_condition_a_loaded_model(tmp_path):
    config = hub_config(transforms={"parameters": {"hue": [-0.1, 0.1], "rotation": 0.5, "h_flip": 0.5}})
    ref = reference(config)
    model = load_histaug(write_release(tmp_path / "release", config, ref))
    params = to_official_params({"dihedral": torch.tensor([6.0]), "hue": torch.tensor([0.05])},
                                model.transforms_parameters)
    assert sorted(params) == ["h_flip", "hue", "rotation"] and params["rotation"][0].item() == 2
    x = torch.randn(1, DIM)
    with torch.no_grad():
        assert (model(x, params) - ref(x, params)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not trained on 'erosion'"):
        to_official_params({"morphology": torch.tensor([-1.0])}, model.transforms_parameters)
    with pytest.raises(ValueError, match="trained range"):
        to_official_params({"hue": torch.tensor([0.3])}, model.transforms_parameters)
