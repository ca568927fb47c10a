import pickle

import kornia.augmentation as K
import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from skimage.color import hed2rgb, rgb2hed
from torch.utils.data import DataLoader, Dataset

from augment import (
    PARAM_SCHEMA,
    RandomHEDJitter,
    RandomStainJitter,
    RandomStainNA,
    StainNAStatistics,
    check_params,
    identity_params,
)
from augment.functional import hed_jitter, hed_to_rgb, rgb_to_hed, stain_jitter
from tests.conftest import STAINS_A, concentrations, render

STATS = StainNAStatistics([62.0, 25.0, -12.0], [6.0, 4.0, 4.0], [14.0, 9.0, 7.0], [2.0, 1.5, 1.5])


def make_all(p: float = 1.0, same_on_batch: bool = False):
    return [
        RandomHEDJitter(p=p, same_on_batch=same_on_batch),
        RandomStainJitter(p=p, same_on_batch=same_on_batch),
        RandomStainNA(STATS, p=p, same_on_batch=same_on_batch),
    ]


@pytest.fixture
def tiles() -> torch.Tensor:
    return render(concentrations(4, 32), STAINS_A)


def test_hed_conversion_matches_skimage():
    rgb = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    ours = rgb_to_hed(rgb)[0].permute(1, 2, 0).numpy()
    assert np.allclose(ours, rgb2hed(rgb[0].permute(1, 2, 0).numpy()), atol=1e-6)
    back = hed_to_rgb(rgb_to_hed(rgb))[0].permute(1, 2, 0).numpy()
    assert np.allclose(back, hed2rgb(rgb2hed(rgb[0].permute(1, 2, 0).numpy())), atol=1e-6)


def test_identity_params_give_identity(tiles):
    ident = identity_params(("hed_scale", "hed_shift"), 4)
    assert torch.allclose(hed_jitter(tiles, ident["hed_scale"], ident["hed_shift"]), tiles, atol=1e-4)
    out = stain_jitter(tiles, torch.zeros(4, 3, 2), torch.ones(4, 2), torch.zeros(4, 2))
    assert torch.allclose(out, tiles, atol=1e-4)


def test_hed_scale_scales_haematoxylin(tiles):
    scale = torch.tensor([[1.5, 1.0, 1.0]]).expand(4, 3)
    out = hed_jitter(tiles, scale, torch.zeros(4, 3))
    h_in, h_out = rgb_to_hed(tiles, clip=False)[:, 0], rgb_to_hed(out, clip=False)[:, 0]
    stained = h_in.abs() > 0.02
    assert torch.allclose(h_out[stained], 1.5 * h_in[stained], rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("aug", make_all(), ids=lambda a: type(a).__name__)
def test_dtype_rank_no_mutation_and_replay(aug, tiles):
    x = tiles.clone()
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.equal(x, tiles)
    assert torch.isfinite(y).all() and not torch.allclose(y, x)
    assert torch.equal(aug(x, params=aug._params), y)
    check_params(aug._params, aug.param_keys, 4)
    u8 = (tiles[0] * 255).round().to(torch.uint8)
    out = aug(u8)
    assert out.dtype == torch.uint8 and out.shape == u8.shape


@pytest.mark.parametrize("aug", make_all(p=0.0), ids=lambda a: type(a).__name__)
def test_p_zero_is_identity(aug, tiles):
    assert torch.allclose(aug(tiles), tiles)


@pytest.mark.parametrize("aug", make_all(same_on_batch=True), ids=lambda a: type(a).__name__)
def test_same_on_batch_draws_once(aug, tiles):
    aug(tiles)
    for key in aug.param_keys:
        value = aug._params[key]
        assert torch.equal(value, value[:1].expand_as(value))


@pytest.mark.parametrize("aug", make_all(), ids=lambda a: type(a).__name__)
def test_pickle_round_trip(aug, tiles):
    clone = pickle.loads(pickle.dumps(aug))
    y = aug(tiles)
    assert torch.equal(clone(tiles, params=aug._params), y)


@pytest.mark.parametrize("aug", make_all(), ids=lambda a: type(a).__name__)
def test_torchvision_compose_and_kornia_sequential_with_mask(aug, tiles):
    pipeline = T.Compose([T.RandomHorizontalFlip(p=0.5), aug])
    u8 = (tiles[0] * 255).round().to(torch.uint8)
    assert pipeline(u8).dtype == torch.uint8
    seq = K.AugmentationSequential(aug, data_keys=["input", "mask"])
    mask = (torch.rand(4, 1, 32, 32) > 0.5).float()
    img, out_mask = seq(tiles, mask)
    assert img.shape == tiles.shape and torch.equal(out_mask, mask)


class _Tiles(Dataset):
    def __init__(self, aug):
        self.aug = aug
        self.tile = render(concentrations(1, 16), STAINS_A)[0]

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.aug(self.tile)


@pytest.mark.parametrize("aug", make_all()[:1], ids=lambda a: type(a).__name__)
def test_dataloader_workers_draw_differently(aug):
    loader = DataLoader(_Tiles(aug), batch_size=2, num_workers=2)
    first, second = list(loader)
    assert not torch.allclose(first[0], second[0])  # worker 0 vs worker 1


def test_param_schema_and_checks():
    assert set(PARAM_SCHEMA) >= {"hed_scale", "hed_shift", "lab_mean", "lab_std"}
    with pytest.raises(ValueError, match="hed_scale"):
        check_params({"hed_scale": torch.ones(2, 4)}, ("hed_scale",), 2)
    with pytest.raises(KeyError, match="hed_shift"):
        RandomHEDJitter(p=1.0)(torch.rand(1, 3, 8, 8), params={"hed_scale": torch.ones(1, 3)})


def test_stain_na_statistics_fit_and_transfer(real_tiles):
    stats = StainNAStatistics.fit(real_tiles)
    aug = RandomStainNA(stats, spread=0.0, p=1.0)
    out = aug(real_tiles.float() / 255)
    assert torch.allclose(aug._params["lab_mean"], torch.tensor(stats.mean_of_means).expand(8, 3))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="at least 2"):
        StainNAStatistics.fit(real_tiles[:1])


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="p:"):
        RandomHEDJitter(p=1.5)
    with pytest.raises(ValueError, match="scale"):
        RandomHEDJitter(scale=(1.2, 0.8))
