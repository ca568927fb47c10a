"""The libvips fast path for fixed per-pixel maps equals the tile engine (<= 1 level) and falls back cleanly."""

import numpy as np
import pytest
import torch

pyvips = pytest.importorskip("pyvips")

from genpath.io.slide import open_slide  # noqa: E402
from genpath.io.synthetic_slide import write_synthetic_slide  # noqa: E402
from genpath.wsi import engine, vips_slide  # noqa: E402
from normalization import build_normalizer  # noqa: E402
from normalization.fused import (  # noqa: E402
    apply_od_map_uint8,
    lab_transfer_matrices,
    reinhard_transfer_uint8,
    vahadane_apply_uint8,
)
from normalization.slide import SlideOptions, normalize_slide  # noqa: E402
from normalization.vips_maps import nnls_od_map_vips, od_map_vips, reinhard_lab_map_vips  # noqa: E402


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, patches):
    folder = tmp_path_factory.mktemp("vips")
    return write_synthetic_slide(folder / "in.svs", 1100, 700, patches, kind="svs", tile=256, mpp=0.5, seed=5,
                                 tissue_share=0.5)


@pytest.fixture(scope="module", params=["macenko", "reinhard", "vahadane"])
def fitted(request, target_image):
    return build_normalizer(request.param).fit(target_image)


@pytest.fixture
def vips_calls(monkeypatch):
    """Count slides written by libvips."""
    calls = []
    real = engine.write_mapped_slide

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "write_mapped_slide", spy)
    return calls


def _level0(path):
    with open_slide(path) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions).astype(int)


def _vips_image(images: torch.Tensor):
    array = np.ascontiguousarray(images.permute(1, 2, 0).numpy())
    return pyvips.Image.new_from_memory(array.tobytes(), array.shape[1], array.shape[0], 3, "uchar")


def _bytes(image) -> torch.Tensor:
    return torch.from_numpy(image.numpy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def all_colours():
    """Every 8th level of each channel (32³ colours) plus random bytes, as one (3,H,W) image."""
    levels = torch.arange(0, 256, 8, dtype=torch.uint8)
    grid = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(3, 32 * 32, 32)
    noise = torch.randint(0, 256, (3, 1024, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return torch.cat([grid, noise], 2).contiguous()


def test_od_map_matches_the_uint8_kernel_on_every_colour(all_colours):
    matrix = torch.tensor([[0.9, 0.1, 0.05], [0.1, 0.8, 0.1], [0.0, 0.2, 0.9]])
    expected = apply_od_map_uint8(all_colours[None], matrix[None])[0]
    got = _bytes(od_map_vips(_vips_image(all_colours), matrix))
    assert (got.int() - expected.int()).abs().max() <= 1
    assert torch.equal(_bytes(od_map_vips(_vips_image(all_colours), torch.eye(3))), all_colours)  # identity


def test_od_map_declines_maps_that_would_overflow(all_colours):
    assert od_map_vips(_vips_image(all_colours), torch.full((3, 3), 40.0)) is None
    assert od_map_vips(_vips_image(all_colours), torch.full((3, 3), float("nan"))) is None


def test_nnls_and_lab_maps_match_the_uint8_kernels(all_colours):
    stains = torch.nn.functional.normalize(torch.tensor([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]), dim=0)
    target = torch.nn.functional.normalize(torch.tensor([[0.55, 0.15], [0.75, 0.9], [0.35, 0.4]]), dim=0)
    scale = torch.tensor([1.2, 0.8])
    expected = vahadane_apply_uint8(all_colours[None], stains[None], scale[None], target[None])[0]
    got = _bytes(nnls_od_map_vips(_vips_image(all_colours), stains, scale, target))
    assert (got.int() - expected.int()).abs().max() <= 1

    mean, std = torch.tensor([[60.0, 10.0, -5.0]]), torch.tensor([[15.0, 8.0, 6.0]])
    target_mean, target_std = torch.tensor([[65.0, 20.0, -10.0]]), torch.tensor([[12.0, 10.0, 7.0]])
    expected = reinhard_transfer_uint8(all_colours[None], mean, std, target_mean, target_std)[0]
    p, q = lab_transfer_matrices(mean, std, target_mean, target_std)
    got = _bytes(reinhard_lab_map_vips(_vips_image(all_colours), p[0], q[0]))
    assert (got.int() - expected.int()).abs().max() <= 1


def test_fast_path_equals_the_tile_engine(tmp_path, slide_path, fitted, vips_calls):
    options = {"tile_size": 256, "compression": "zlib", "qc": False}
    fast = normalize_slide(slide_path, tmp_path / "fast.tiff", fitted, SlideOptions(**options))
    assert len(vips_calls) == 1
    reference = normalize_slide(slide_path, tmp_path / "ref.tiff", fitted, SlideOptions(**options, fast_path=False))
    assert len(vips_calls) == 1
    assert (fast.tiles, fast.tissue_tiles, fast.dimensions, fast.mpp) == (
        reference.tiles, reference.tissue_tiles, reference.dimensions, reference.mpp)
    assert 0 < fast.tissue_tiles < fast.tiles  # some background windows: kept as they are on both paths
    assert np.abs(_level0(fast.output) - _level0(reference.output)).max() <= 1
    with open_slide(fast.output) as out, open_slide(reference.output) as ref:
        assert out.backend == "openslide" and out.mpp == pytest.approx((0.5, 0.5))
        assert out.level_count == ref.level_count
    import tifffile

    with tifffile.TiffFile(fast.output) as tiff:
        assert tiff.pages[0].description.startswith("Aperio Image Library") and "MPP = 0.5" in tiff.pages[0].description
        assert [page.subfiletype for page in tiff.pages] == [0, 1, 1, 1] and tiff.pages[0].is_tiled
    assert not list(tmp_path.glob(".*partial"))


def test_background_windows_keep_their_pixels(tmp_path, slide_path, target_image, vips_calls):
    normalizer = build_normalizer("macenko").fit(target_image)
    result = normalize_slide(slide_path, tmp_path / "out.tiff", normalizer,
                             SlideOptions(tile_size=256, compression="zlib", qc=False, min_tissue=0.5))
    assert len(vips_calls) == 1 and result.tissue_tiles < result.tiles
    source, out = _level0(slide_path), _level0(result.output)
    kept = (source == out).all(-1)
    tiles = kept[:512, :1024].reshape(2, 256, 4, 256).all((1, 3))  # the 8 whole tiles
    assert tiles.any() and not tiles.all()  # background tiles are bit-exact copies; tissue tiles are mapped


@pytest.mark.parametrize("options", [
    {"overlap": 16}, {"output_format": "ome-zarr"}, {"level": 1}, {"fast_path": False},
])
def test_options_that_need_the_tile_engine(tmp_path, slide_path, target_image, vips_calls, options):
    normalizer = build_normalizer("macenko").fit(target_image)
    suffix = ".ome.zarr" if options.get("output_format") else ".tiff"
    normalize_slide(slide_path, tmp_path / f"out{suffix}", normalizer, SlideOptions(tile_size=256, qc=False, **options))
    assert vips_calls == []


def test_neural_tile_functions_and_plain_images_use_the_tile_engine(tmp_path, slide_path, patches, vips_calls):
    normalize_slide(slide_path, tmp_path / "inv.tiff", lambda w: 255 - w, SlideOptions(tile_size=256, qc=False))
    png = tmp_path / "slide.png"
    from PIL import Image

    Image.fromarray(np.concatenate([patches[0], patches[1]], 1)).save(png)
    normalizer = build_normalizer("macenko").fit(torch.from_numpy(patches[0]).permute(2, 0, 1))
    normalize_slide(png, tmp_path / "png.tiff", normalizer, SlideOptions(tile_size=128, qc=False), mpp=0.5)
    assert vips_calls == []


def test_a_libvips_failure_falls_back_to_the_tile_engine(tmp_path, slide_path, target_image, monkeypatch):
    def broken(source, mapped, foreground, output, *args, **kwargs):
        output.with_name(f".{output.name}.partial").write_bytes(b"half")
        raise pyvips.Error("simulated decode failure")

    monkeypatch.setattr(engine, "write_mapped_slide", broken)
    normalizer = build_normalizer("macenko").fit(target_image)
    result = normalize_slide(slide_path, tmp_path / "out.tiff", normalizer, SlideOptions(tile_size=256, qc=False))
    with open_slide(result.output) as out:
        assert out.dimensions == (1100, 700)
    assert not (tmp_path / ".out.tiff.partial").exists()


def test_vips_source_declines_files_libvips_reads_differently(tmp_path, slide_path):
    with open_slide(slide_path) as reader:
        assert vips_slide.vips_source(reader, SlideOptions()) is not None
        assert vips_slide.vips_source(reader, SlideOptions(overlap=8)) is None
        monkey = type("R", (), {"path": tmp_path / "missing.svs", "dimensions": reader.dimensions})()
        assert vips_slide.vips_source(monkey, SlideOptions()) is None
