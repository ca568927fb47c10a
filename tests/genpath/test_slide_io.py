import json

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from genpath.io.slide import OpenSlideReader, composite_on_white, open_slide
from genpath.io.slide_writer import OmeZarrWriter, TiffPyramidWriter, downsample_2x, is_complete_ome_zarr
from genpath.io.synthetic_slide import write_synthetic_slide
from tests.conftest import SAMPLES


def smooth_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([128 + 90 * np.sin(xx / 53), 128 + 90 * np.cos(yy / 41), 140 + 40 * np.sin((xx + yy) / 67)],
                    -1).astype(np.uint8)


@pytest.mark.parametrize("kind, backend, vendor", [
    ("tiff", "openslide", "generic-tiff"), ("svs", "openslide", "aperio"),
    ("ome-tiff", "tifffile", "ome"), ("flat", "tifffile", "tiff"),
])
def test_reader_backends_levels_and_mpp(tmp_path, patches, kind, backend, vendor):
    path = write_synthetic_slide(tmp_path / f"s.{kind}.tif", 1000, 700, patches, kind=kind, tile=256, mpp=0.25)
    with open_slide(path) as slide:
        assert (slide.backend, slide.vendor) == (backend, vendor)
        assert slide.dimensions == (1000, 700)
        assert slide.mpp == pytest.approx((0.25, 0.25))
        if kind != "flat":
            assert slide.level_count == 3 and slide.level_dimensions[1] == (500, 350)
            assert slide.level_downsamples[1] == pytest.approx(2.0)
        region = slide.read_region((100, 50), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        # outside the slide is white, inside is the image
        edge = slide.read_region((980, 690), 0, (40, 20))
        assert (edge[10:, :] == 255).all() and (edge[:, 20:] == 255).all()
        assert slide.thumbnail(8).shape == (88, 125, 3)


def test_mpp_override_and_missing(tmp_path, patches):
    path = write_synthetic_slide(tmp_path / "nompp.tif", 600, 400, patches, kind="tiff", tile=256, mpp=None)
    with open_slide(path) as slide:
        assert slide.mpp is None
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == (0.5, 0.5)
    with pytest.raises(ValueError, match="mpp"):
        open_slide(path, mpp=-1)


def test_real_aperio_sample():
    with open_slide(SAMPLES / "slides" / "he_cmu_small_region.svs") as slide:
        assert slide.backend == "openslide" and slide.vendor == "aperio"
        assert slide.dimensions == (2220, 2967) and slide.mpp == pytest.approx((0.499, 0.499))
        assert slide.read_region((1000, 1000), 0, (128, 128)).std() > 5


def test_rgba_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[1, 1] = (200, 0, 0, 128)
    rgb = composite_on_white(rgba)
    assert rgb[0, 1].tolist() == [255, 255, 255]  # alpha 0 → white, not black
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[1, 1].tolist() == [227, 127, 127]  # (200·128 + 255·127) / 255


def test_openslide_alpha_zero_regions_read_white(monkeypatch, tmp_path, patches):
    path = write_synthetic_slide(tmp_path / "a.tif", 512, 512, patches, kind="tiff", tile=256)
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideReader)
        from PIL import Image

        monkeypatch.setattr(slide._slide, "read_region", lambda *a: Image.new("RGBA", a[2], (0, 0, 0, 0)))
        assert (slide.read_region((0, 0), 0, (16, 16)) == 255).all()


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        open_slide(tmp_path / "missing.svs")
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    with pytest.raises(ValueError, match="no backend reads"):
        open_slide(broken)
    with open_slide(SAMPLES / "slides" / "he_cmu_small_region.svs") as slide:
        with pytest.raises(ValueError, match="level"):
            slide.read_region((0, 0), 5, (8, 8))


@pytest.mark.parametrize("compression, tolerance", [("zlib", 0), ("jpeg", 4)])
def test_tiff_writer_openslide_reads_every_level_and_mpp(tmp_path, compression, tolerance):
    image = smooth_image(700, 1100)
    tile = 256
    writer = TiffPyramidWriter(tmp_path / "o.tiff", 1100, 700, tile, mpp=0.25, compression=compression)
    out = writer.write(image[y : y + tile] for y in range(0, 700, tile))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tiff"]  # no temporary leftovers
    slide = openslide.OpenSlide(str(out))
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.level_dimensions == ((1100, 700), (550, 350), (275, 175), (138, 88))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.properties["openslide.objective-power"] == "40"
    level0 = np.asarray(slide.read_region((0, 0), 0, (1100, 700)))[..., :3].astype(int)
    assert np.abs(level0 - image).mean() <= max(tolerance / 2, 0)
    level1 = np.asarray(slide.read_region((0, 0), 1, (550, 350)))[..., :3].astype(int)
    assert np.abs(level1 - downsample_2x(image)).mean() <= max(tolerance / 2, 0)
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff and all(page.is_tiled for page in tif.pages)
        assert len(tif.pages) == 4  # levels in the main IFD chain


def test_tiff_writer_generic_without_aperio(tmp_path):
    image = smooth_image(300, 300)
    out = TiffPyramidWriter(tmp_path / "g.tiff", 300, 300, 128, mpp=0.5, compression="zlib", aperio=False).write(
        [image[:128], image[128:256], image[256:]]
    )
    slide = openslide.OpenSlide(str(out))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_tiff_writer_failure_leaves_no_output(tmp_path):
    image = smooth_image(300, 300)

    def strips():
        yield image[:128]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TiffPyramidWriter(tmp_path / "x.tiff", 300, 300, 128).write(strips())
    assert list(tmp_path.iterdir()) == []


def test_ome_zarr_writer_ngff_metadata_and_levels(tmp_path):
    image = smooth_image(600, 900)
    writer = OmeZarrWriter(tmp_path / "o.ome.zarr", 900, 600, tile=256, mpp=0.5)
    writer.open(resume=False)
    for row, y in enumerate(range(0, 600, 256)):
        writer.write_strip(row, image[y : y + 256])
    assert not is_complete_ome_zarr(tmp_path / "o.ome.zarr")
    writer.finish()
    assert is_complete_ome_zarr(tmp_path / "o.ome.zarr")
    zattrs = json.loads((tmp_path / "o.ome.zarr" / ".zattrs").read_text())
    ms = zattrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [
        [1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    assert [c["label"] for c in zattrs["omero"]["channels"]] == ["R", "G", "B"]
    group = zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r", zarr_format=2)
    assert group["0"].chunks == (3, 256, 256) and group["0"].shape == (3, 600, 900)
    assert (np.moveaxis(np.asarray(group["0"]), 0, -1) == image).all()
    assert (np.moveaxis(np.asarray(group["1"]), 0, -1) == downsample_2x(image)).all()
    with open_slide(tmp_path / "o.ome.zarr") as slide:
        assert slide.backend == "zarr" and slide.mpp == (0.5, 0.5) and slide.level_count == 3


def test_ome_zarr_resume_keeps_logged_tiles_only_under_same_key(tmp_path):
    image = smooth_image(512, 512)
    writer = OmeZarrWriter(tmp_path / "r.ome.zarr", 512, 512, tile=256)
    writer.open(resume=True, key="a")
    writer.write_strip(0, image[:256])
    with open(writer.log, "a") as log:
        log.write("1,")  # a torn line from a kill -9
    assert OmeZarrWriter(tmp_path / "r.ome.zarr", 512, 512, tile=256).open(resume=True, key="a") == {(0, 0), (0, 1)}
    assert OmeZarrWriter(tmp_path / "r.ome.zarr", 512, 512, tile=256).open(resume=True, key="b") == set()
