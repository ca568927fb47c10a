"""The HistAug transform family: known answers, the kornia contract, masks/boxes/keypoints following the image."""

import pickle

import kornia.augmentation as K
import pytest
import torch
from kornia.augmentation.container.params import ParamItem
from kornia.geometry.transform import warp_affine
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
    dihedral_matrix,
    gaussian_blur,
    geometric_matrix,
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


# -- geometry moves masks, boxes and keypoints with the image (kornia's geometric base) -----------


def _geometric_seq(transforms, *data_keys, p=1.0):
    aug = RandomHistologyTransform(transforms, p=p, p_each=1.0)
    return K.AugmentationSequential(aug, data_keys=["input", *data_keys])


def _replay(seq, x, *others, **values):
    """Run ``seq`` with all samples on and the given param values (the rest as drawn)."""
    seq(x, *others)
    item = seq._params[0]
    data = {k: v.clone() for k, v in item.data.items()}
    data["batch_prob"] = torch.ones(len(x))
    for key, value in values.items():
        data[key] = torch.as_tensor(value, dtype=torch.float32).expand_as(data[key]).clone()
    return seq(x, *others, params=[ParamItem(item.name, data)]), data


def _pattern(b: int = 4, size: int = 16) -> torch.Tensor:
    """An asymmetric bright "L" on a mid-grey, textured background: no symmetry of the square fixes it."""
    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.2 * torch.rand(b, 3, size, size, generator=g)
    x[:, :, 2:12, 3:6] = 0.9
    x[:, :, 9:12, 6:11] = 0.9
    return x


def test_geometric_matrix_is_the_pixel_map_of_crop_and_dihedral():
    x = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    params = AugmentationSampler(["crop", "dihedral"], p_each=1.0).sample(8, generator=torch.Generator().manual_seed(2))
    warped = warp_affine(x, geometric_matrix(params, (12, 12))[:, :2], (12, 12), align_corners=True)
    assert torch.allclose(warped, apply_augmentation_params(x, params), atol=1e-5)
    rot = dihedral_matrix(torch.tensor([1]), (12, 12))[0]
    assert (rot @ torch.tensor([0.0, 0.0, 1.0])).tolist() == [0.0, 11.0, 1.0]  # rot90: top-left -> bottom-left
    flip = K.RandomHorizontalFlip(p=1.0)
    flip(x)
    assert torch.equal(dihedral_matrix(torch.tensor([4]), (12, 12))[0], flip.transform_matrix[0])


def test_masks_follow_dihedral_exactly_in_augmentation_sequential():
    torch.manual_seed(0)
    x = _pattern(8)
    mask = (x[:, :1] > 0.5).float()
    seq = _geometric_seq(["dihedral"], "mask", p=0.5)
    out, out_mask = seq(x, mask)
    params = seq._params[0].data
    on = params["batch_prob"] > 0.5
    assert 0 < int(on.sum()) < 8  # some samples transformed, some not
    assert torch.equal(out_mask, (out[:, :1] > 0.5).float())  # the mask is where the image's pattern went
    expected = mask.clone()
    expected[on] = dihedral(mask[on], params["dihedral"])
    assert torch.equal(out_mask, expected)
    assert not torch.equal(out_mask, mask)  # it did move (the old intensity base left it in place)
    replayed = seq(x, mask, params=seq._params)
    assert torch.equal(replayed[0], out) and torch.equal(replayed[1], out_mask)


def test_flip_matches_kornias_own_flip_for_every_data_key():
    x = _pattern(2)
    mask = (x[:, :1] > 0.5).float()
    boxes = torch.tensor([[[3.0, 2.0, 10.0, 11.0]]]).repeat(2, 1, 1)
    points = torch.tensor([[[4.0, 5.0], [8.0, 10.0]]]).repeat(2, 1, 1)
    keys = ("mask", "bbox_xyxy", "keypoints")
    ours, _ = _replay(_geometric_seq(["dihedral"], *keys), x, mask, boxes, points, dihedral=4.0)
    theirs = K.AugmentationSequential(K.RandomHorizontalFlip(p=1.0), data_keys=["input", *keys])(x, mask, boxes, points)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_label_map_crop_and_rotation_known_answer():
    x = _pattern(1)
    labels = torch.arange(256).view(1, 1, 16, 16)  # a label per pixel, integer dtype
    seq = _geometric_seq(["crop", "dihedral", "hue", "gamma", "blur"], "mask")
    # crop side 0.375 * 16 = 6 at x0 = y0 = 0.3 * 10 = 3: output pixel i samples 3 + i / 3 (never a tie)
    (out, out_labels), _ = _replay(seq, x, labels, crop_scale=0.375, crop_center=[0.3, 0.3], dihedral=1.0)
    assert out_labels.dtype == labels.dtype
    src = (3 + torch.arange(16) / 3).round().long()
    expected = labels[0, 0][src][:, src]
    assert torch.equal(out_labels[0, 0], torch.rot90(expected, 1))  # then a quarter turn; colour ops ignored


def test_boxes_and_keypoints_stay_on_the_marked_pixels():
    x = torch.zeros(4, 3, 16, 16)
    x[:, 1:, 5:9, 4:7] = 1.0  # a bright box in green and blue, pixels x 4..6, y 5..8
    x[:, 0, 12, 10] = 1.0  # a marked red pixel at (x=10, y=12)
    mask = x[:, 1:2].clone()  # the box only
    boxes = torch.tensor([[[4.0, 5.0, 6.0, 8.0]]]).repeat(4, 1, 1)
    points = torch.tensor([[[10.0, 12.0]]]).repeat(4, 1, 1)
    seq = _geometric_seq(["dihedral", "crop"], "mask", "bbox_xyxy", "keypoints")
    (out, out_mask, out_boxes, out_points), params = _replay(
        seq, x, mask, boxes, points, dihedral=[0.0, 3.0, 5.0, 6.0], crop_scale=[1.0, 1.0, 0.8, 0.8],
        crop_center=[0.5, 0.5])
    for i in range(4):
        kx, ky = out_points[i, 0].round().long().tolist()
        assert out[i, 0, ky, kx] == out[i, 0].max() > 0.5  # the keypoint is on the marked pixel's peak
        ys, xs = out_mask[i, 0].nonzero().unbind(1)
        region = torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()
        assert torch.allclose(out_boxes[i, 0], region, atol=1.0 if i >= 2 else 0.0), i  # box bounds the moved box
    inv_x, inv_mask, inv_boxes, inv_points = seq.inverse(out, out_mask, out_boxes, out_points)
    assert torch.allclose(inv_boxes, boxes, atol=1e-4) and torch.allclose(inv_points, points, atol=1e-4)
    assert torch.allclose(inv_x[:2], x[:2], atol=1e-5) and torch.equal(inv_mask[:2], mask[:2])  # dihedral: exact


def test_inverse_and_histaug_params():
    from augment.histaug import HistAugModel

    aug = RandomHistologyTransform(["dihedral"], p=1.0, p_each=1.0)
    x = _pattern(3)
    u8 = (x[0] * 255).round().to(torch.uint8)
    assert torch.equal(aug.inverse(aug(u8)), u8)  # the image contract holds for inverse too; dihedral is exact
    aug = RandomHistologyTransform(["dihedral", "crop", "gamma"], p=1.0)
    aug(x)
    assert set(aug._params) == set(aug.param_keys) | {"batch_prob", "forward_input_shape"}
    model = HistAugModel(embed_dim=8, num_chunks=2, hidden_dim=8, depth=1, num_heads=2,
                         transforms=["dihedral", "crop", "gamma"])
    model.check_params(aug._params, 3)
