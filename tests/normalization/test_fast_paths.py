"""The fast paths equal the reference paths: fused uint8 kernels, partial selection, closed-form algebra."""

import pytest
import torch
import torch.nn.functional as F

from normalization import MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer
from normalization.fastmath import inverse_2x2, largest_eigenvalue_2x2, masked_quantile, pinv_stains
from normalization.functional import (
    apply_od_map,
    concentrations_nonneg,
    od_to_rgb,
    rgb_to_od,
    sample_pixels,
    tissue_mask_od,
)
from normalization.fused import apply_od_map_uint8, lab_of_uint8_pixels, od_of_bytes, tissue_mask_of_bytes
from tests.conftest import STAINS_A, concentrations, render

ALL = [MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer]


def to_bytes(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def hostile_uint8(size: int = 64) -> torch.Tensor:
    """White, black, flat, noise and ~1%-tissue tiles, uint8."""
    g = torch.Generator().manual_seed(1)
    sparse = torch.ones(3, size, size)
    sparse[:, :6, :6] = render(concentrations(1, 6), STAINS_A)[0]
    tiles = [torch.ones(3, size, size), torch.zeros(3, size, size),
             torch.tensor([0.8, 0.4, 0.6])[:, None, None].expand(3, size, size),
             torch.rand(3, size, size, generator=g), sparse]
    return to_bytes(torch.stack(tiles))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("policy", ["passthrough", "reference"])
def test_fused_uint8_path_equals_float_path_within_one_level(cls, policy, real_tiles, target_image):
    norm = cls(on_invalid=policy).fit(target_image)
    small = to_bytes(F.interpolate(real_tiles[:3].float() / 255, size=(64, 64), mode="bilinear", antialias=True))
    tiles = torch.cat([small, hostile_uint8()])
    fast, valid = norm(tiles, return_valid=True)
    eager, valid_eager = norm(tiles.float() / 255, return_valid=True)
    assert fast.dtype == torch.uint8 and torch.equal(valid, valid_eager)
    diff = (fast.int() - to_bytes(eager).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    if policy == "passthrough" or cls is ReinhardNormalizer:
        assert torch.equal(fast[~valid], tiles[~valid])  # invalid tiles come back untouched
    full = norm(real_tiles)
    assert (full.int() - to_bytes(norm(real_tiles.float() / 255)).int()).abs().max() <= 1


@pytest.mark.parametrize("cls", ALL)
def test_fused_uint8_path_is_batch_invariant(cls, real_tiles, target_image):
    norm = cls().fit(target_image)
    tiles = torch.cat([real_tiles, hostile_uint8(128)])
    whole = norm(tiles)
    single = torch.cat([norm(tiles[i : i + 1]) for i in range(len(tiles))])
    diff = (whole.int() - single.int()).abs()
    # Macenko and Reinhard are bit-exact; Vahadane's 60 batched iterations differ in the last float
    # bits between batch sizes (as its float path, within 1e-5), which can flip a rounding
    assert diff.max() <= (1 if cls is VahadaneNormalizer else 0) and (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("cls", ALL)
def test_fused_source_statistics_path(cls, real_tiles, target_image):
    norm = cls().fit(target_image)
    stats = norm.estimate_source(real_tiles)
    fast = norm(real_tiles, source=stats)
    eager = to_bytes(norm(real_tiles.float() / 255, source=stats))
    assert (fast.int() - eager.int()).abs().max() <= 1


def test_apply_od_map_uint8_identity_and_random_maps():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 33, 17), dtype=torch.uint8, generator=g)
    assert torch.equal(apply_od_map_uint8(x, torch.eye(3).expand(4, 3, 3)), x)
    every = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    assert torch.equal(apply_od_map_uint8(every, torch.eye(3)[None]), every)
    m = torch.eye(3) + 0.3 * torch.randn(4, 3, 3, generator=g)
    fast = apply_od_map_uint8(x, m)
    eager = to_bytes(apply_od_map(x.float() / 255, m))
    assert (fast.int() - eager.int()).abs().max() <= 1


def test_apply_od_map_float_matches_its_definition():
    x = torch.rand(3, 3, 20, 20, dtype=torch.float64)
    m = torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, 3, dtype=torch.float64)
    reference = od_to_rgb(torch.bmm(m, rgb_to_od(x).reshape(3, 3, -1))).reshape(x.shape)
    assert torch.allclose(apply_od_map(x, m), reference, atol=1e-12)


def test_sample_tissue_of_uint8_equals_float(real_tiles):
    norm = MacenkoNormalizer()
    a, b = norm.sample_tissue(real_tiles), norm.sample_tissue(real_tiles.float() / 255)
    assert torch.equal(a.rgb, b.rgb) and torch.equal(a.mask, b.mask) and torch.equal(a.enough, b.enough)
    assert torch.allclose(a.od, b.od, atol=1e-6)
    px = sample_pixels(real_tiles, 1000)
    assert torch.allclose(od_of_bytes(px), rgb_to_od(px.float() / 255), atol=1e-6)


def sort_quantile(values: torch.Tensor, mask: torch.Tensor, q):
    """The reference: one full sort (the implementation before partial selection)."""
    mask = mask.expand_as(values)
    qs = torch.tensor([q] if isinstance(q, float) else list(q), dtype=values.dtype)
    ordered = values.masked_fill(~mask, float("inf")).sort(dim=-1).values
    count = mask.sum(dim=-1, keepdim=True)
    out = ordered.gather(-1, torch.round(qs * (count - 1).clamp(min=0).to(values.dtype)).long())
    out = torch.where(count > 0, out, torch.zeros_like(out))
    return out.squeeze(-1) if isinstance(q, float) else out


@pytest.mark.parametrize("n", [1, 7, 600, 5000, 13108])
def test_masked_quantile_equals_a_full_sort(n):
    g = torch.Generator().manual_seed(n)
    for trial in range(6):
        values = torch.randn(3, 2, n, generator=g)
        if trial % 2:
            values = values.round(decimals=1)  # ties
        if trial % 3 == 0:
            values = values.cumsum(-1)  # ordered runs, as raster data
        mask = torch.rand(3, 1 if trial % 2 else 2, n, generator=g) < torch.rand(3, 1, 1, generator=g)
        mask[0] = False  # an empty row: 0
        for q in (0.01, 0.99, (0.01, 0.99), 0.5, (0.0, 0.3, 1.0), 0.001):
            assert torch.equal(masked_quantile(values, mask, q), sort_quantile(values, mask, q)), (trial, q)


def test_closed_form_small_algebra():
    g = torch.Generator().manual_seed(0)
    stains = F.normalize(torch.rand(16, 3, 2, generator=g) + 0.05, dim=1)
    assert torch.allclose(pinv_stains(stains), torch.linalg.pinv(stains), atol=1e-5)
    degenerate = torch.stack([torch.stack([stains[0, :, 0], stains[0, :, 0]], -1), torch.zeros(3, 2)])
    assert torch.allclose(pinv_stains(degenerate), torch.linalg.pinv(degenerate), atol=1e-5)
    sym = torch.rand(16, 2, 2, generator=g)
    sym = sym @ sym.transpose(1, 2) + 0.1 * torch.eye(2)
    assert torch.allclose(largest_eigenvalue_2x2(sym), torch.linalg.eigvalsh(sym)[:, -1], atol=1e-5)
    assert torch.allclose(inverse_2x2(sym), torch.linalg.inv(sym), atol=1e-4)


def residual_choice_nonneg(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """The earlier formulation: compare the two single-stain residuals explicitly."""
    flat = od.reshape(od.shape[0], 3, -1)
    free = torch.linalg.pinv(stains) @ flat
    single = ((stains.transpose(1, 2) @ flat) / (stains * stains).sum(1).unsqueeze(-1)).clamp(min=0)
    only_h = torch.stack([single[:, 0], torch.zeros_like(single[:, 0])], 1)
    only_e = torch.stack([torch.zeros_like(single[:, 1]), single[:, 1]], 1)
    residual = lambda c: ((stains @ c - flat) ** 2).sum(1)  # noqa: E731
    best = torch.where((residual(only_h) <= residual(only_e)).unsqueeze(1), only_h, only_e)
    return torch.where((free >= 0).all(1, keepdim=True), free, best).reshape(od.shape[0], 2, *od.shape[2:])


def test_concentrations_nonneg_agrees_with_explicit_residuals():
    g = torch.Generator().manual_seed(0)
    od = torch.randn(4, 3, 5000, generator=g, dtype=torch.float64) * 0.5 + 0.3
    stains = F.normalize(torch.rand(4, 3, 2, generator=g, dtype=torch.float64) + 0.05, dim=1)
    assert torch.allclose(concentrations_nonneg(od, stains), residual_choice_nonneg(od, stains), atol=1e-9)


def test_byte_tissue_mask_and_lab_tables():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=g)
    grey = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(1, 3, 16, 16)
    for images in (x, grey):
        assert torch.equal(tissue_mask_of_bytes(images), tissue_mask_od(rgb_to_od(images.float() / 255)))
    from kornia.color import rgb_to_lab

    pixels = x.flatten(2).transpose(1, 2)
    reference = rgb_to_lab(pixels.float().transpose(1, 2)[..., None] / 255)[..., 0]
    assert (lab_of_uint8_pixels(pixels) - reference).abs().amax(dim=(0, 2)).lt(torch.tensor([0.02, 0.1, 0.05])).all()
