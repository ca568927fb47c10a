import numpy as np
import pytest
import torch
import zarr

from genpath.io.slide import open_slide
from genpath.io.synthetic_slide import write_synthetic_slide
from normalization import MacenkoNormalizer
from normalization.slide import SlideOptions, normalize_slide


@pytest.fixture(scope="module")
def fitted(target_image):
    return MacenkoNormalizer().fit(target_image)


@pytest.fixture
def slide_path(tmp_path, patches):
    return write_synthetic_slide(tmp_path / "in.svs", 1024, 768, patches, kind="svs", tile=256, mpp=0.5, seed=3)


class CountingNormalizer(torch.nn.Module):
    """Inverts colours and counts the windows it sees (a stand-in for a neural method)."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images):
        self.seen += images.shape[0]
        return 255 - images


def test_slide_output_keeps_size_and_mpp_and_is_openslide_readable(tmp_path, slide_path, fitted):
    result = normalize_slide(slide_path, tmp_path / "out.tiff", fitted, SlideOptions(tile_size=256))
    assert result.dimensions == (1024, 768) and result.mpp == pytest.approx(0.5)
    assert 0 < result.tissue_tiles < result.tiles == 12
    with open_slide(tmp_path / "out.tiff") as out, open_slide(slide_path) as src:
        assert out.backend == "openslide"
        assert out.level_dimensions == src.level_dimensions and out.mpp == pytest.approx(src.mpp)
    for name in result.qc:
        assert (tmp_path / "out.tiff.qc").exists() and name.endswith(".png")


def test_per_slide_statistics_leave_no_seams(tmp_path, slide_path, fitted):
    """With one map per slide, normalizing tile by tile equals normalizing the whole image at once."""
    result = normalize_slide(slide_path, tmp_path / "n.ome.zarr", fitted,
                             SlideOptions(tile_size=256, output_format="ome-zarr", min_tissue=0.0, qc=False))
    with open_slide(slide_path) as src:
        whole = src.read_region((0, 0), 0, (1024, 768))
        from genpath.tissue import detect_tissue
        from normalization.slide import slide_source_statistics, tissue_downsample

        ds = tissue_downsample(src, SlideOptions())
        mask = detect_tissue(src.thumbnail(ds))
        stats = slide_source_statistics(src, fitted, mask, src.dimensions[0] / mask.shape[1], 0, SlideOptions())
    expected = fitted(torch.from_numpy(whole).permute(2, 0, 1), source=stats).permute(1, 2, 0).numpy()
    got = np.moveaxis(np.asarray(zarr.open_group(result.output, mode="r")["0"]), 0, -1)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_background_tiles_are_copied_without_the_normalizer(tmp_path, patches):
    path = write_synthetic_slide(tmp_path / "sparse.tif", 1024, 1024, patches, kind="tiff", tile=256,
                                 tissue_share=0.15, seed=5)
    counter = CountingNormalizer()
    options = SlideOptions(tile_size=256, output_format="ome-zarr", qc=False, compression="zlib")
    result = normalize_slide(path, tmp_path / "o.ome.zarr", counter, options)
    assert counter.seen == result.tissue_tiles < result.tiles
    with open_slide(path) as src, open_slide(tmp_path / "o.ome.zarr") as out:
        a, b = src.read_region((0, 0), 0, (1024, 1024)), out.read_region((0, 0), 0, (1024, 1024))
    unchanged = (a == b).all(-1)
    assert unchanged.mean() > 0.3 and (~unchanged).mean() > 0.05


def test_ome_zarr_resume_after_interruption_redoes_only_missing_tiles(tmp_path, slide_path):
    options = SlideOptions(tile_size=256, output_format="ome-zarr", min_tissue=0.0, qc=False)
    counter = CountingNormalizer()

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        normalize_slide(slide_path, tmp_path / "r.ome.zarr", counter, options, progress=interrupt, resume=True)
    assert not (tmp_path / "r.ome.zarr" / ".zattrs").exists() or "multiscales" not in (
        tmp_path / "r.ome.zarr" / ".zattrs").read_text()
    resumed = CountingNormalizer()
    normalize_slide(slide_path, tmp_path / "r.ome.zarr", resumed, options, resume=True)
    assert resumed.seen == 12 - 4  # the first tile row (4 tiles) was logged before the interruption
    fresh = CountingNormalizer()
    normalize_slide(slide_path, tmp_path / "f.ome.zarr", fresh, options)
    with open_slide(tmp_path / "r.ome.zarr") as r, open_slide(tmp_path / "f.ome.zarr") as f:
        assert (r.read_region((0, 0), 0, (1024, 768)) == f.read_region((0, 0), 0, (1024, 768))).all()
        assert r.level_count == f.level_count == 3


def test_overlap_mode_runs_neural_style_processors(tmp_path, slide_path):
    counter = CountingNormalizer()
    options = SlideOptions(tile_size=256, overlap=32, output_format="ome-zarr", min_tissue=0.0, qc=False)
    normalize_slide(slide_path, tmp_path / "ov.ome.zarr", counter, options)
    with open_slide(slide_path) as src, open_slide(tmp_path / "ov.ome.zarr") as out:
        a, b = src.read_region((0, 0), 0, (1024, 768)), out.read_region((0, 0), 0, (1024, 768))
    assert np.abs((255 - a.astype(int)) - b).max() <= 1


def test_level_option_and_errors(tmp_path, slide_path, fitted):
    result = normalize_slide(slide_path, tmp_path / "l1.tiff", fitted, SlideOptions(tile_size=128, level=1, qc=False))
    assert result.dimensions == (512, 384) and result.mpp == pytest.approx(1.0)
    with pytest.raises(ValueError, match="level"):
        normalize_slide(slide_path, tmp_path / "l9.tiff", fitted, SlideOptions(level=9))
    with pytest.raises(ValueError, match="overlap"):
        SlideOptions(tile_size=256, overlap=200)
    with pytest.raises(ValueError, match="output_format"):
        SlideOptions(output_format="png")


def test_estimate_source_matches_per_tile_estimate(real_tiles):
    norm = MacenkoNormalizer().fit(real_tiles[0])
    stats = norm.estimate_source(real_tiles[3])
    np.testing.assert_allclose(norm(real_tiles[3:4], source=stats).float(), norm(real_tiles[3:4]).float(), atol=1)
    blank = torch.full((3, 64, 64), 250, dtype=torch.uint8)
    with pytest.raises(ValueError, match="source_images"):
        norm.estimate_source(blank)


def test_fit_on_thumbnail_option(tmp_path, slide_path, fitted):
    options = SlideOptions(tile_size=256, fit_on="thumbnail", qc=False)
    result = normalize_slide(slide_path, tmp_path / "t.tiff", fitted, options)
    assert result.tissue_tiles > 0
    with pytest.raises(ValueError, match="fit_on"):
        SlideOptions(fit_on="everything")
