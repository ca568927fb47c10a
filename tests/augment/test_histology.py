"""The HistAug transform family: pure functions against known answers, the kornia transform contract."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from augment.functional import (
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    adjust_hue,
    adjust_saturation,
    apply_augmentation_params,
    crop_resize,
    dihedral,
    gaussian_blur,
    morphology,
)
from augment.histology import RandomHistologyTransform
from augment.params import PARAM_SCHEMA, check_param_ranges, identity_params
from augment.sampling import TRANSFORM_KEYS, AugmentationSampler
from tests.conftest import STAINS_A, concentrations, render


@pytest.fixture
def tiles() -> torch.Tensor:
    return render(concentrations(4, 32), STAINS_A)


def test_colour_functions_known_answers(tiles):
    ones = torch.ones(4)
    assert torch.allclose(adjust_brightness(tiles, ones * 0.5), tiles * 0.5)
    assert torch.allclose(adjust_gamma(tiles, ones * 2), tiles**2, atol=1e-6)
    flat = adjust_contrast(tiles, ones * 0)
    assert torch.allclose(flat, flat.mean((1, 2, 3), keepdim=True), atol=1e-6)  # contrast 0: the grey mean
    grey = adjust_saturation(tiles, ones * 0)
    assert torch.allclose(grey, grey[:, :1].expand_as(grey), atol=1e-5)  # saturation 0: grey
    assert torch.allclose(adjust_hue(tiles, ones * 0), tiles, atol=1e-5)
    turned = adjust_hue(adjust_hue(tiles, ones * 0.25), ones * -0.25)
    assert torch.allclose(turned, tiles, atol=1e-4)


def test_morphology_blur_known_answers():
    x = torch.zeros(2, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    out = morphology(x, torch.tensor([1.0, 2.0]))  # dilation grows a bright dot to (2r+1)²
    assert out[0, 0].sum() == 9 and out[1, 0].sum() == 25
    dark = 1 - x
    assert (morphology(dark, torch.tensor([-1.0, 0.0]))[0, 0] == 0).sum() == 9  # erosion grows a dark dot
    assert torch.equal(morphology(dark, torch.tensor([-1.0, 0.0]))[1], dark[1])
    blurred = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    assert torch.equal(blurred[0], x[0]) and blurred[1].max() < 0.5
    assert torch.allclose(blurred[1].sum(), x[1].sum(), atol=1e-4)  # mass kept (reflect border, far away)
    const = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([2.0])), const, atol=1e-6)


def test_dihedral_group_and_crop_known_answers():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4) / 16
    outs = [dihedral(x, torch.tensor([k]))[0, 0] for k in range(8)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8  # 8 distinct symmetries
    assert torch.equal(outs[4], x[0, 0].flip(-1)) and torch.equal(outs[1], torch.rot90(x[0, 0], 1))
    y = x
    for _ in range(4):
        y = dihedral(y, torch.tensor([1]))
    assert torch.equal(y, x)
    top_left = crop_resize(x, torch.tensor([0.5]), torch.tensor([[0.0, 0.0]]))[0, 0]
    corners = torch.tensor([top_left[0, 0], top_left[0, -1], top_left[-1, 0], top_left[-1, -1]]) * 16
    assert torch.allclose(corners, torch.tensor([0.0, 1.0, 4.0, 5.0]), atol=1e-4)
    assert torch.equal(crop_resize(x, torch.tensor([1.0]), torch.tensor([[0.3, 0.7]])), x)
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.rand(1, 3, 4, 6), torch.tensor([1]))


def test_identity_params_leave_images_unchanged(tiles):
    keys = AugmentationSampler().keys
    params = identity_params(keys, 4)
    assert torch.allclose(apply_augmentation_params(tiles, params), tiles, atol=1e-5)


def test_sampler_modes_strength_and_ranges():
    s = AugmentationSampler(p_each=1.0)
    g = torch.Generator().manual_seed(0)
    wsi = s.sample(6, mode="wsi", generator=g)
    for key, value in wsi.items():
        assert value.shape == (6, *PARAM_SCHEMA[key].shape) and torch.equal(value, value[:1].expand_as(value))
    patch = s.sample(6, mode="patch", generator=g)
    assert not torch.equal(patch["hue"], patch["hue"][:1].expand(6))
    check_param_ranges(patch, s.keys)
    zero = s.sample(6, generator=g, strength=0.0)
    for key, value in identity_params(tuple(k for k in s.keys if k not in ("dihedral", "crop_center")), 6).items():
        assert torch.allclose(zero[key], value), key
    a = s.sample(3, generator=torch.Generator().manual_seed(1))
    b = s.sample(3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="transforms"):
        AugmentationSampler(["sharpen"])
    with pytest.raises(ValueError, match="ranges\\['hue'\\]"):
        AugmentationSampler(ranges={"hue": (-0.9, 0.1)})
    with pytest.raises(ValueError, match="mode"):
        s.sample(2, mode="slide")
    with pytest.raises(ValueError, match="documented|expected values in"):
        check_param_ranges({"gamma": torch.tensor([9.0])}, ("gamma",))
    with pytest.raises(ValueError, match="integer"):
        check_param_ranges({"dihedral": torch.tensor([1.5])}, ("dihedral",))


def test_transform_contract(tiles):
    aug = RandomHistologyTransform(p=1.0, p_each=1.0)
    x = tiles.clone()
    y = aug(x)
    assert y.shape == x.shape and torch.equal(x, tiles) and not torch.allclose(x, y)
    params = aug._params
    assert torch.equal(aug(x, params=params), y)
    assert set(aug.param_keys) == {k for keys in TRANSFORM_KEYS.values() for k in keys}
    u8 = (tiles[0] * 255).round().to(torch.uint8)
    assert aug(u8).dtype == torch.uint8 and aug(u8).shape == u8.shape
    assert torch.allclose(RandomHistologyTransform(p=0.0)(tiles), tiles)
    same = RandomHistologyTransform(p=1.0, same_on_batch=True)
    same(tiles)
    assert all(torch.equal(v, v[:1].expand_as(v)) for k, v in same._params.items() if k in same.param_keys)
    clone = pickle.loads(pickle.dumps(aug))
    assert torch.equal(clone(tiles, params=params), y)
    bad = dict(params, gamma=torch.full((4,), 9.0))
    with pytest.raises(ValueError, match="gamma"):
        aug(tiles, params=bad)


class _Tiles(Dataset):
    def __init__(self, aug):
        self.aug, self.tile = aug, render(concentrations(1, 16), STAINS_A)[0]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.aug(self.tile)


def test_dataloader_workers_draw_differently():
    loader = DataLoader(_Tiles(RandomHistologyTransform(["hue", "gamma"], p=1.0, p_each=1.0)), batch_size=2,
                        num_workers=2)
    first, second = list(loader)
    assert not torch.allclose(first[0], second[0])
