"""The fast augmentation paths equal kornia's operations and the earlier compositions they replace."""

import pytest
import torch
from kornia.enhance import adjust_contrast_with_mean_subtraction, adjust_gamma, adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_and_resize
from kornia.morphology import dilation, erosion

import augment.functional as A
from augment import RandomHistologyTransform, RandomStainNA, StainNAStatistics
from augment.sampling import AugmentationSampler


@pytest.fixture
def images() -> torch.Tensor:
    """Random colours plus the edge cases of HSV: grey, black/white bands, ties at the maximum, bytes."""
    x = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    x[0] = x[0, :1]
    x[1, :, :4], x[1, :, 4:8] = 0.0, 1.0
    x[2] = (x[2] * 255).round() / 255
    x[3, 0] = x[3, 1]
    return x


def test_colour_operations_match_kornia(images):
    factor = torch.tensor([0.0, 0.5, 0.9, 1.0, 1.3, 3.0])
    turns = torch.tensor([-0.5, -0.2, 0.0, 0.05, 0.3, 0.5])
    assert torch.allclose(A.adjust_saturation(images, factor), adjust_saturation(images, factor).clamp(0, 1), atol=1e-5)
    assert torch.allclose(A.adjust_hue(images, turns), adjust_hue(images, turns * 2 * torch.pi).clamp(0, 1), atol=1e-5)
    assert torch.allclose(A.adjust_gamma(images, factor + 0.2), adjust_gamma(images, factor + 0.2), atol=1e-6)
    assert torch.allclose(A.adjust_contrast(images, factor), adjust_contrast_with_mean_subtraction(images, factor),
                          atol=1e-6)


@pytest.mark.parametrize("radius", [1, 2, 4])
def test_morphology_is_exactly_kornias_geodesic(images, radius):
    kernel = torch.ones(2 * radius + 1, 2 * radius + 1)
    grown = A.morphology(images, torch.full((6,), float(radius)))
    shrunk = A.morphology(images, torch.full((6,), float(-radius)))
    assert torch.equal(grown, dilation(images, kernel, border_type="geodesic"))
    assert torch.equal(shrunk, erosion(images, kernel, border_type="geodesic"))


def test_blur_matches_kornia_per_sample_and_is_batch_invariant(images):
    sigma = torch.tensor([0.0, 0.3, 0.7, 1.0, 1.5, 2.9])
    out = A.gaussian_blur(images, sigma)
    assert torch.equal(out[0], images[0])
    for i in range(1, 6):
        half = max(1, int(torch.ceil(3 * sigma[i])))
        reference = gaussian_blur2d(images[i : i + 1], (2 * half + 1, 2 * half + 1), sigma[i].expand(1, 2))
        assert torch.allclose(out[i : i + 1], reference, atol=1e-6)
        assert torch.allclose(out[i : i + 1], A.gaussian_blur(images[i : i + 1], sigma[i : i + 1]), atol=1e-7)


def test_crop_matches_kornias_crop_and_resize(images):
    scale = torch.tensor([0.3, 0.5, 0.6, 0.9, 0.99, 0.7])
    center = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    side = scale * 24
    x0, y0 = center[:, 1] * (24 - side), center[:, 0] * (24 - side)
    x1, y1 = x0 + side - 1, y0 + side - 1
    boxes = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1), torch.stack([x1, y1], -1),
                         torch.stack([x0, y1], -1)], 1)
    reference = crop_and_resize(images, boxes, (24, 24), mode="bilinear", align_corners=True).clamp(0, 1)
    assert torch.allclose(A.crop_resize(images, scale, center), reference, atol=2e-5)


def test_hed_jitter_is_the_hed_round_trip(images):
    g = torch.Generator().manual_seed(2)
    scale, shift = 1 + 0.1 * torch.randn(6, 3, generator=g), 0.05 * torch.randn(6, 3, generator=g)
    hed = A.rgb_to_hed(images, clip=False)
    reference = A.hed_to_rgb(hed * scale[..., None, None] + shift[..., None, None])
    assert torch.allclose(A.hed_jitter(images, scale, shift), reference, atol=1e-5)


def test_skipping_identity_samples_equals_applying_each_sample(images):
    params = AugmentationSampler(p_each=0.5).sample(6, generator=torch.Generator().manual_seed(3))
    batch = A.apply_augmentation_params(images, params)
    for i in range(6):
        one = A.apply_augmentation_params(images[i : i + 1], {k: v[i : i + 1] for k, v in params.items()})
        assert torch.allclose(batch[i : i + 1], one, atol=1e-6)
    identity = {k: torch.full_like(v, float(A.PARAM_SCHEMA[k].identity)) for k, v in params.items()}
    out = A.apply_augmentation_params(images, identity)
    assert torch.equal(out, images) and out is not images


def test_stain_na_byte_path_within_one_level(real_tiles):
    aug = RandomStainNA(StainNAStatistics.fit(real_tiles), p=1.0)
    blank = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32), torch.full((3, 32, 32), 0.5)])
    for tiles in (real_tiles, (blank * 255).to(torch.uint8)):
        fast = aug(tiles)
        reference = (aug(tiles.float() / 255, params=aug._params) * 255).round()
        assert fast.dtype == torch.uint8 and (fast.float() - reference).abs().max() <= 1


def test_uint8_round_trip_is_exact_when_nothing_applies(real_tiles):
    assert torch.equal(RandomHistologyTransform(p=0.0)(real_tiles), real_tiles)
    assert torch.equal(RandomHistologyTransform(p=1.0, p_each=0.0)(real_tiles[0]), real_tiles[0])
