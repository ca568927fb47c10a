"""The colour anchor: known answers on Beer–Lambert renders, glass untouched, NaN-free, inside the normalizer."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from genpath.pipelines import StainFuserNormalizer
from normalization import StainNormalizer
from normalization.colour_anchor import anchor_statistics, glass_weight, reinhard_anchor
from normalization.functional import REFERENCE_STAINS, od_to_rgb, render_od, rgb_to_lab
from tests.normalization.test_stainfuser import he_tiles, tiny_pipeline

#: a second, redder and bluer stain pair (unit columns): another scanner / lab
OTHER_STAINS = torch.nn.functional.normalize(torch.tensor([[0.65, 0.10], [0.70, 0.85], [0.30, 0.52]]), dim=0)


def renders(stains: torch.Tensor, scale: float = 1.0, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    conc = torch.rand(n, 2, 32, 32, generator=g) * torch.tensor([1.2, 0.8])[:, None, None] + 0.15
    return od_to_rgb(render_od(conc * scale, stains))


def lab_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((rgb_to_lab(a) - rgb_to_lab(b)).norm(dim=1).mean())


def test_anchor_maps_one_stain_matrix_onto_the_targets_statistics():
    source, target = renders(REFERENCE_STAINS), renders(OTHER_STAINS, scale=1.3)
    mean, std = anchor_statistics(target[:1])
    out = reinhard_anchor(source, mean, std)
    got_mean, got_std = anchor_statistics(out[:1])
    torch.testing.assert_close(got_mean, mean, atol=0.05, rtol=0)
    torch.testing.assert_close(got_std, std, atol=0.05, rtol=0)
    # the same concentrations under the other stains: LAB distance 13.2 before, 2.7 after
    assert lab_distance(source, target) > 12 and lab_distance(out, target) < 3.5


def test_identity_when_the_output_already_matches_and_batch_invariance():
    tiles = renders(REFERENCE_STAINS, n=3, seed=1)
    mean, std = anchor_statistics(tiles[:1])
    torch.testing.assert_close(reinhard_anchor(tiles[:1], mean, std), tiles[:1], atol=2e-4, rtol=0)
    batch = reinhard_anchor(tiles, mean, std)
    for i in range(3):
        torch.testing.assert_close(reinhard_anchor(tiles[i : i + 1], mean, std), batch[i : i + 1], atol=1e-6, rtol=0)


def test_glass_is_neither_counted_nor_changed_and_the_input_is_never_modified():
    tiles = renders(REFERENCE_STAINS).double()
    tiles[:, :, :, :12] = 1.0  # a glass strip
    target = renders(OTHER_STAINS, scale=1.3)[:1]
    mean, std = anchor_statistics(target)
    before = tiles.clone()
    out = reinhard_anchor(tiles, mean, std)
    assert torch.equal(tiles, before) and out.dtype == torch.float64
    assert torch.equal(out[..., :12], tiles[..., :12])
    # glass does not move the statistics: the tissue part maps as it would without the strip
    alone = reinhard_anchor(tiles[..., 12:].contiguous(), mean, std)
    torch.testing.assert_close(out[..., 12:], alone, atol=1e-6, rtol=0)
    # padding the target with glass does not change its statistics either
    padded = torch.ones(1, 3, 32, 64)
    padded[..., :32] = target
    for a, b in zip(anchor_statistics(padded), (mean, std), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert glass_weight(torch.ones(1, 3, 2, 2)).eq(0).all()


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_flat_black_and_white_tiles_stay_finite(value):
    mean, std = anchor_statistics(renders(OTHER_STAINS)[:1])
    tile = torch.full((2, 3, 16, 16), value)
    out = reinhard_anchor(tile, mean, std)
    assert out.isfinite().all() and out.min() >= 0 and out.max() <= 1
    if value == 1.0:
        assert torch.equal(out, tile)


def test_statistics_pool_targets_of_different_sizes_and_refuse_all_glass():
    a, b = renders(REFERENCE_STAINS, n=1), renders(OTHER_STAINS, n=1)[..., :16]
    pooled = anchor_statistics([a[0], b])
    joined = torch.cat([a.flatten(2), b.flatten(2)], -1).reshape(1, 3, 1, -1)
    for x, y in zip(pooled, anchor_statistics(joined), strict=True):
        torch.testing.assert_close(x, y)
    with pytest.raises(ValueError, match="images: expected stained pixels"):
        anchor_statistics(torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="white_od"):
        glass_weight(a, 0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("anchor") / "pipe"
    tiny_pipeline().save_pretrained(path)
    return path


def test_normalizer_anchor_default_contract_and_old_states(model_dir, tmp_path):
    with pytest.raises(ValueError, match="colour_anchor: expected one of"):
        StainFuserNormalizer(model_dir, colour_anchor="macenko")
    target = renders(OTHER_STAINS, scale=1.3, n=1)
    norm = StainFuserNormalizer(model_dir, num_inference_steps=1).fit(target)
    plain = StainFuserNormalizer(model_dir, num_inference_steps=1, colour_anchor="none").fit(target)
    assert norm.colour_anchor == "reinhard" and norm.config["colour_anchor"] == "reinhard"
    torch.testing.assert_close(norm.anchor_mean, anchor_statistics(target)[0])
    tiles = torch.cat([he_tiles(2, seed=3), torch.ones(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)])
    before = tiles.clone()
    out = norm(tiles)
    assert torch.equal(tiles, before) and out.isfinite().all()
    raw = plain(tiles)
    torch.testing.assert_close(out[:2], reinhard_anchor(raw[:2], norm.anchor_mean, norm.anchor_std), atol=1e-6, rtol=0)
    assert torch.equal(out[2:], tiles[2:])  # white and black tiles never reach the model
    assert lab_distance(out[:2], target.expand(2, -1, -1, -1)) < lab_distance(raw[:2], target.expand(2, -1, -1, -1))
    one = norm((tiles[0] * 255).round().to(torch.uint8))
    assert one.dtype == torch.uint8 and one.shape == (3, 32, 32)
    torch.testing.assert_close(norm(tiles[1:2]), out[1:2], atol=1e-5, rtol=0)  # batch-invariant
    # state round trip keeps the anchor; a state saved before the anchor existed loads with it off
    norm.save(tmp_path / "state.safetensors")
    loaded = StainNormalizer.load(tmp_path / "state.safetensors")
    assert loaded.colour_anchor == "reinhard" and torch.equal(loaded(tiles), out)
    state = {k: v for k, v in load_file(tmp_path / "state.safetensors").items() if not k.startswith("anchor_")}
    save_file(state, tmp_path / "old.safetensors", metadata={"genpath_normalizer": "stainfuser",
                                                              "config": f'{{"model": "{model_dir}", '
                                                                        '"num_inference_steps": 1}'})
    old = StainNormalizer.load(tmp_path / "old.safetensors")
    assert old.colour_anchor == "none" and torch.equal(old(tiles), raw)
    # a user tissue mask restricts the target's colour statistics too
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:, :16] = True
    masked = StainFuserNormalizer(model_dir, num_inference_steps=1).fit(target, tissue_mask=mask)
    torch.testing.assert_close(masked.anchor_mean, anchor_statistics(target[..., :16].contiguous())[0])


def test_folder_default_steps_from_model_index(model_dir, tmp_path):
    import json
    import shutil

    from genpath.pipelines.stainfuser_normalizer import DEFAULT_STEPS_KEY, folder_default_steps

    assert folder_default_steps(model_dir) is None and StainFuserNormalizer(model_dir).num_inference_steps == 4
    marked = tmp_path / "marked"
    shutil.copytree(model_dir, marked)
    index = json.loads((marked / "model_index.json").read_text())
    for value, expected in [(1, 1), (0, None), ("2", None), (True, None)]:
        (marked / "model_index.json").write_text(json.dumps({**index, DEFAULT_STEPS_KEY: value}))
        assert folder_default_steps(marked) == expected
    (marked / "model_index.json").write_text(json.dumps({**index, DEFAULT_STEPS_KEY: 1}))
    assert StainFuserNormalizer(marked).num_inference_steps == 1
    assert StainFuserNormalizer(marked, num_inference_steps=3).num_inference_steps == 3
