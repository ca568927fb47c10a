"""HistAug: the model's contract, bad input, learning a known mapping, the bag transform, training."""

import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from typer.testing import CliRunner

from augment.feature import HistAugCollate, HistAugTransform
from augment.histaug import HistAugModel
from genpath.cli import app
from tests.conftest import ROOT

D = 24


def tiny(**kwargs) -> HistAugModel:
    torch.manual_seed(0)
    return HistAugModel(embed_dim=D, num_chunks=4, hidden_dim=16, depth=1, num_heads=2, **kwargs)


def perturbed() -> HistAugModel:
    model = tiny()
    with torch.no_grad():
        model.out.weight.normal_(0, 0.1)
    return model


def test_untrained_model_is_the_identity_and_keeps_shape_dtype():
    model = tiny()
    x = torch.randn(7, D, dtype=torch.float64)
    params = model.sample_params(7, mode="patch", generator=torch.Generator().manual_seed(0))
    y = model(x, params)
    assert y.dtype == torch.float64 and torch.allclose(y, x, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model = perturbed()
    model.fit_statistics(torch.randn(50, D) * 3 + 1)
    model.save_pretrained(tmp_path / "h")
    loaded = HistAugModel.from_pretrained(tmp_path / "h")
    x = torch.randn(5, D)
    params = model.sample_params(5, mode="patch", generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loaded(x, params), model(x, params), atol=1e-6)
    assert loaded.keys == model.keys and torch.equal(loaded.embed_std, model.embed_std)


def test_wsi_params_broadcast_and_bags_match_flat():
    model = perturbed().eval()
    x = torch.randn(6, D)
    one = model.sample_params(1, generator=torch.Generator().manual_seed(2))
    many = {k: v.expand(6, *v.shape[1:]) for k, v in one.items()}
    assert torch.allclose(model(x, one), model(x, many), atol=1e-5)
    bags = torch.randn(3, 4, D)
    per_bag = model.sample_params(3, mode="patch", generator=torch.Generator().manual_seed(3))
    flat = {k: v.repeat_interleave(4, 0) for k, v in per_bag.items()}
    assert torch.allclose(model(bags, per_bag).reshape(12, D), model(bags.reshape(12, D), flat), atol=1e-5)
    wsi = model.sample_params(5, mode="wsi", generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(v, v[:1].expand_as(v)) for v in wsi.values())


def test_bad_input_is_named():
    model = tiny()
    params = model.sample_params(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"embeddings: expected \\(N,{D}\\)"):
        model(torch.randn(2, D + 1), params)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((2, D), float("nan")), params)
    with pytest.raises(KeyError, match="unknown \\['sharpness'\\]"):
        model(torch.randn(2, D), {**params, "sharpness": torch.ones(2)})
    missing = {k: v for k, v in params.items() if k != "hue"}
    with pytest.raises(KeyError, match="missing \\['hue'\\]"):
        model(torch.randn(2, D), missing)
    with pytest.raises(ValueError, match="params\\['gamma'\\]: expected values in"):
        model(torch.randn(2, D), {**params, "gamma": torch.full((2,), 7.0)})
    with pytest.raises(ValueError, match="params\\['hue'\\]: expected shape"):
        model(torch.randn(2, D), {**params, "hue": torch.zeros(3)})
    with pytest.raises(ValueError, match="num_chunks"):
        HistAugModel(embed_dim=4, num_chunks=8)


def test_learns_a_known_parameter_dependent_shift():
    """Target = x + (brightness - 1)·u + hue·v + flip·w: HistAug must beat the identity baseline."""
    torch.manual_seed(0)
    model = HistAugModel(embed_dim=D, num_chunks=4, hidden_dim=32, depth=1, num_heads=2,
                         transforms=["brightness", "hue", "dihedral"], p_each=1.0)
    u, v, w = torch.randn(3, D) * 2

    def target(x, p):
        return x + (p["brightness"] - 1)[:, None] * u + p["hue"][:, None] * 10 * v + (p["dihedral"] >= 4)[:, None] * w

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        x = torch.randn(64, D)
        p = model.sample_params(64, mode="patch")
        loss = (model(x, p) - target(x, p)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(256, D)
    p = model.sample_params(256, mode="patch", generator=torch.Generator().manual_seed(9))
    t = target(x, p)
    with torch.no_grad():
        err_model = (model(x, p) - t).pow(2).mean()
    err_identity = (x - t).pow(2).mean()
    assert err_model < 0.25 * err_identity


class _Bags(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.ones(5, D), i % 2


def test_bag_transform_p_pickle_and_workers():
    model = perturbed()
    bags = torch.randn(3, 5, D)
    assert torch.equal(HistAugTransform(model, p=0.0)(bags), bags)
    aug = HistAugTransform(model, p=1.0)
    out = aug(bags, generator=torch.Generator().manual_seed(0))
    assert out.shape == bags.shape and not torch.allclose(out, bags)
    assert aug(bags[0]).shape == (5, D)
    assert HistAugTransform(model, p=1.0, mode="patch")(bags).shape == bags.shape
    clone = pickle.loads(pickle.dumps(aug))
    assert torch.equal(clone(bags, generator=torch.Generator().manual_seed(0)), out)
    loader = DataLoader(_Bags(), batch_size=2, num_workers=2, collate_fn=HistAugCollate(aug))
    (first, labels), (second, _) = list(loader)
    assert labels.tolist() == [0, 1] and not torch.allclose(first[0], second[0])  # workers draw differently
    with pytest.raises(ValueError, match="mode"):
        HistAugTransform(model, mode="slide")


def test_train_histaug_two_steps_resume_and_cache(tmp_path):
    out = tmp_path / "h"
    args = ["train", "histaug", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(out)]
    result = CliRunner().invoke(app, [*args, "--max-steps", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cache = out / "clean_embeddings.zarr"
    stamp = cache.stat().st_mtime_ns
    CliRunner().invoke(app, [*args, "--max-steps", "3"], catch_exceptions=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and cache.stat().st_mtime_ns == stamp  # resumed, cache reused
    model = HistAugModel.from_pretrained(out / "model")
    # the shipped encoder is recorded as its built-in preset: no path for the folder to follow
    assert json.loads((out / "model" / "encoder.json").read_text()) == {"name": "genpath-small.samples", "kwargs": {}}
    x = torch.randn(4, model.config.embed_dim)
    assert model(x, model.sample_params(4)).shape == x.shape
