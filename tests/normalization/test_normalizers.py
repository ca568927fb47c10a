import pytest
import torch
import torch.nn.functional as F

from normalization import MacenkoNormalizer, ReinhardNormalizer, StainNormalizer, VahadaneNormalizer
from normalization.functional import od_to_rgb, render_od, rgb_to_od, tissue_mask_od
from tests.conftest import STAINS_A, STAINS_B, concentrations, render

ALL = [MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer]


def bad_tiles(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    white = torch.ones(3, size, size)
    black = torch.zeros(3, size, size)
    flat = torch.tensor([0.8, 0.4, 0.6])[:, None, None].expand(3, size, size)
    noise = torch.rand(3, size, size, generator=g)
    sparse = torch.ones(3, size, size)
    sparse[:, :6, :6] = render(concentrations(1, 6), STAINS_A)[0]  # ~1% tissue
    return torch.stack([white, black, flat, noise, sparse])


@pytest.mark.parametrize("cls", ALL)
def test_contract_dtype_rank_device_and_no_mutation(cls, real_tiles, target_image):
    norm = cls().fit(target_image)
    x8 = real_tiles.clone()
    out8 = norm(x8)
    assert out8.dtype == torch.uint8 and out8.shape == x8.shape and torch.equal(x8, real_tiles)
    xf = real_tiles.float() / 255
    for dtype in (torch.float32, torch.float64, torch.float16):
        out = norm(xf.to(dtype))
        assert out.dtype == dtype and out.shape == xf.shape
    single = norm(real_tiles[0])
    assert single.shape == real_tiles[0].shape
    assert (single.int() - out8[0].int()).abs().max() <= 1


@pytest.mark.parametrize("cls", ALL)
def test_unfitted_raises_runtime_error_with_instructions(cls):
    with pytest.raises(RuntimeError, match=r"\.fit\("):
        cls()(torch.rand(3, 8, 8))


@pytest.mark.parametrize("cls", ALL)
def test_fit_returns_self_and_accepts_several_targets(cls, real_tiles):
    norm = cls()
    assert norm.fit([real_tiles[0], real_tiles[1:3]]) is norm
    assert bool(norm.fitted)


@pytest.mark.parametrize("cls", ALL)
def test_save_load_round_trip(cls, tmp_path, real_tiles, target_image):
    norm = cls(on_invalid="reference").fit(target_image)
    path = norm.save(tmp_path / "norm.safetensors")
    loaded = StainNormalizer.load(path)
    assert type(loaded) is cls and loaded.on_invalid == "reference"
    assert torch.equal(loaded(real_tiles), norm(real_tiles))
    # also the plain state_dict route
    fresh = cls()
    fresh.load_state_dict(norm.state_dict())
    assert torch.equal(fresh(real_tiles), norm(real_tiles))


def test_load_rejects_wrong_class(tmp_path, target_image):
    path = MacenkoNormalizer().fit(target_image).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="reinhard"):
        ReinhardNormalizer.load(path)


@pytest.mark.parametrize("cls", ALL)
def test_batch_invariance_1_8_32(cls, target_image):
    g = torch.Generator().manual_seed(0)
    conc = concentrations(32, 48, seed=5) * (0.5 + torch.rand(32, 2, 1, 1, generator=g))
    stains = F.normalize(STAINS_A + 0.05 * torch.rand(32, 3, 2, generator=g), dim=1)
    tiles = od_to_rgb(render_od(conc, stains))
    tiles[5] = 1.0  # one background tile among them
    norm = cls().fit(target_image)
    out32 = norm(tiles)
    out8 = torch.cat([norm(tiles[i : i + 8]) for i in range(0, 32, 8)])
    out1 = torch.cat([norm(tiles[i : i + 1]) for i in range(32)])
    assert torch.allclose(out32, out8, atol=1e-5)
    assert torch.allclose(out32, out1, atol=1e-5)


@pytest.mark.parametrize("cls", ALL)
def test_bad_tiles_are_flagged_finite_and_do_not_affect_others(cls, real_tiles, target_image):
    norm = cls().fit(target_image)
    good = real_tiles[:3].float() / 255
    good = F.interpolate(good, size=(64, 64), mode="bilinear", antialias=True)
    batch = torch.cat([good, bad_tiles()])
    out, valid = norm(batch, return_valid=True)
    assert torch.isfinite(out).all()
    assert valid[:3].all() and not valid[3:].any()
    assert torch.equal(out[3:], batch[3:])  # passthrough
    assert torch.allclose(out[:3], norm(good), atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_on_invalid_policies(cls, target_image):
    tiles = bad_tiles()
    with pytest.raises(ValueError, match="invalid tiles at"):
        cls(on_invalid="raise").fit(target_image)(tiles)
    out = cls(on_invalid="reference").fit(target_image)(tiles)
    assert torch.isfinite(out).all()
    assert out[0].min() > 0.9  # white stays near white (its slightly negative OD is projected on the target plane)


def test_macenko_known_answer_restains_to_target_matrix():
    conc = concentrations(2, seed=7)
    source, target = render(conc, STAINS_A), render(concentrations(1, seed=8), STAINS_B)
    norm = MacenkoNormalizer(beta=0.02).fit(target)
    out = norm(source)
    # Expected: the same tissue rendered with the target's stains, concentrations rescaled per stain.
    od = rgb_to_od(out)
    mask = tissue_mask_od(od, beta=0.05)
    residual = od - torch.einsum("ij,bjhw->bihw", norm.target_stains @ torch.linalg.pinv(norm.target_stains), od)
    assert residual.abs()[mask.unsqueeze(1).expand_as(od)].mean() < 0.01  # output OD lies in the target stain plane
    angles = torch.rad2deg(torch.acos((F.normalize(norm.target_stains, dim=0) * STAINS_B).sum(0).clamp(-1, 1)))
    assert (angles < 3).all()


def test_vahadane_known_answer_close_to_target_rendering():
    conc = concentrations(2, seed=7)
    expected = render(conc, STAINS_B)
    norm = VahadaneNormalizer(beta=0.02).fit(render(conc, STAINS_B))
    out = norm(render(conc, STAINS_A))
    assert (out - expected).abs().mean() < 0.02


def test_reinhard_matches_target_lab_statistics(real_tiles, target_image):
    from normalization.functional import lab_statistics

    norm = ReinhardNormalizer(tissue_only=False).fit(target_image)
    out = norm(real_tiles.float() / 255)
    mean, std = lab_statistics(out)
    assert torch.allclose(mean, norm.target_mean.expand_as(mean), atol=1.5)
    assert torch.allclose(std, norm.target_std.expand_as(std), rtol=0.1)


def test_agreement_with_torchstain(real_tiles, target_image):
    torchstain = pytest.importorskip("torchstain")
    mask = tissue_mask_od(rgb_to_od(real_tiles.float() / 255))
    ts_m = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts_m.fit(target_image)
    ref = torch.stack([ts_m.normalize(t, stains=False)[0].permute(2, 0, 1) for t in real_tiles]).float()
    ours = MacenkoNormalizer(percentile_pixels="all").fit(target_image)(real_tiles).float()
    assert (ours - ref).abs().mean(1)[mask].mean() < 2.0
    ts_r = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    ts_r.fit(target_image)
    ref = torch.stack([ts_r.normalize(t).permute(2, 0, 1) for t in real_tiles]).float()
    ours = ReinhardNormalizer(tissue_only=False).fit(target_image)(real_tiles).float()
    assert (ours - ref).abs().mean(1)[mask].mean() < 2.0


def test_fit_rejects_blank_target():
    with pytest.raises(ValueError, match="tissue pixels"):
        MacenkoNormalizer().fit(torch.ones(3, 32, 32))


def test_settings_validation():
    with pytest.raises(ValueError, match="on_invalid"):
        MacenkoNormalizer(on_invalid="ignore")
    with pytest.raises(ValueError, match="alpha"):
        MacenkoNormalizer(alpha=60)
