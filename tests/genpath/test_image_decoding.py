"""read_image decodes every mode Pillow or tifffile gives to RGB uint8, or refuses it in one line.

Each file is built here (Pillow, tifffile) with known samples; the decoded values are known answers
of the rules in :mod:`genpath.io.images`: 16-bit keeps the high byte, float in [0, 1] scales by 255,
alpha is composited onto white.
"""

import warnings

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from genpath.io.images import read_image

GREY16 = np.array([[0, 32768, 65535, 257, 255]], dtype=np.uint16)
GREY16_AS_8 = [0, 128, 255, 1, 0]
RGB16 = np.zeros((2, 2, 3), dtype=np.uint16)
RGB16[0, 0], RGB16[0, 1], RGB16[1, 0] = (65535, 32768, 0), (257, 514, 1000), (256, 511, 65280)
RGB16_AS_8 = [[[255, 128, 0], [1, 2, 3]], [[1, 1, 255], [0, 0, 0]]]


def decoded(path) -> np.ndarray:
    """``(H,W,3)`` uint8 of ``read_image``, after checking the tensor contract."""
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3 and image.is_contiguous()
    return image.permute(1, 2, 0).numpy()


def mode_of(path) -> str:
    with Image.open(path) as image:
        return image.mode


def grey(array: np.ndarray) -> list:
    """The single channel of a decoded grey image (after checking R = G = B)."""
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    return array[..., 0].tolist()


# 16-bit and wider integers -------------------------------------------------------------------

def test_16_bit_grey_png_keeps_the_high_byte(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "g.png")
    assert mode_of(tmp_path / "g.png") == "I;16"
    assert grey(decoded(tmp_path / "g.png")) == [GREY16_AS_8]  # was all white (Pillow clips to 255)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_16_bit_grey_tiff(tmp_path, byteorder):
    tifffile.imwrite(tmp_path / "g.tif", GREY16, byteorder=byteorder)
    assert grey(decoded(tmp_path / "g.tif")) == [GREY16_AS_8]


def test_16_bit_pgm_opens_as_pillow_mode_i(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "g.pgm")
    assert mode_of(tmp_path / "g.pgm") == "I"
    assert grey(decoded(tmp_path / "g.pgm")) == [GREY16_AS_8]


@pytest.mark.parametrize("kwargs", [
    {}, {"byteorder": ">"}, {"compression": "zlib"}, {"tile": (16, 16)}, {"planarconfig": "separate"},
], ids=["contig", "big-endian", "zlib", "tiled", "planar"])
def test_16_bit_rgb_tiff(tmp_path, kwargs):
    data = np.moveaxis(RGB16, -1, 0) if kwargs.get("planarconfig") == "separate" else RGB16
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb", **kwargs)
    assert decoded(tmp_path / "rgb.tif").tolist() == RGB16_AS_8  # Pillow misplaces planar 16-bit planes


def test_16_bit_rgb_and_grey_alpha_png(tmp_path):
    imagecodecs = pytest.importorskip("imagecodecs")
    (tmp_path / "rgb.png").write_bytes(imagecodecs.png_encode(RGB16))
    assert decoded(tmp_path / "rgb.png").tolist() == RGB16_AS_8
    la = np.array([[[32768, 65535], [0, 32768], [1000, 0]]], dtype=np.uint16)
    (tmp_path / "la.png").write_bytes(imagecodecs.png_encode(la))
    assert grey(decoded(tmp_path / "la.png")) == [[128, 127, 255]]  # opaque, black at alpha 128, transparent


def test_16_bit_rgba_tiff_straight_and_premultiplied_alpha(tmp_path):
    rgba = np.array([[[65535, 32768, 0, 65535], [0, 0, 0, 32768], [0, 0, 0, 0]]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "straight.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    assert decoded(tmp_path / "straight.tif").tolist() == [[[255, 128, 0], [127, 127, 127], [255, 255, 255]]]
    premultiplied = np.array([[[16384, 0, 32768, 32768], [0, 0, 0, 0]]], dtype=np.uint16)  # c·a stored
    tifffile.imwrite(tmp_path / "assoc.tif", premultiplied, photometric="rgb", extrasamples=["assocalpha"])
    assert decoded(tmp_path / "assoc.tif").tolist() == [[[191, 127, 255], [255, 255, 255]]]  # c + 255 - a


def test_16_bit_min_is_white_tiff_is_inverted(tmp_path):
    tifffile.imwrite(tmp_path / "w.tif", GREY16, photometric="miniswhite")
    assert grey(decoded(tmp_path / "w.tif")) == [[255 - v for v in GREY16_AS_8]]


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int16])
def test_wider_or_signed_integers_holding_16_bit_values(tmp_path, dtype):
    values = np.array([[0, 32768, 65535, 256]]) if dtype != np.int16 else np.array([[0, 256, 32767, 512]])
    tifffile.imwrite(tmp_path / "i.tif", values.astype(dtype))
    assert grey(decoded(tmp_path / "i.tif")) == [[v >> 8 for v in values[0].tolist()]]


def test_pillow_32_bit_int_tiff(tmp_path):
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert mode_of(tmp_path / "i.tif") == "I"
    assert grey(decoded(tmp_path / "i.tif")) == [[0, 128, 255]]


@pytest.mark.parametrize(("values", "dtype", "got"), [
    ([0, 70000], np.uint32, r"range \[0, 70000\]"),
    ([-5, 100], np.int32, r"range \[-5, 100\]"),
    ([-5, 100], np.int16, r"range \[-5, 100\]"),
    ([-5, 100], np.int8, r"range \[-5, 100\]"),
])
def test_integers_outside_16_bit_are_refused(tmp_path, values, dtype, got):
    tifffile.imwrite(tmp_path / "i.tif", np.array([values], dtype=dtype))
    with pytest.raises(ValueError, match=rf"^image: expected .*-bit unsigned samples.*, got {got} in .*i\.tif$"):
        read_image(tmp_path / "i.tif")


# float ----------------------------------------------------------------------------------------

def test_float_grey_tiff_in_0_1_scales_by_255(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert mode_of(tmp_path / "f.tif") == "F"
    assert grey(decoded(tmp_path / "f.tif")) == [[0, 128, 255, 64]]  # 127.5 -> 128, 63.75 -> 64


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_rgb_tiff_pillow_cannot_open(tmp_path, dtype):
    rgb = np.array([[[1.0, 0.5, 0.0], [0.2, 0.4, 0.6]]], dtype=dtype)
    tifffile.imwrite(tmp_path / "f.tif", rgb, photometric="rgb")
    expected = np.rint(rgb.astype(np.float64) * 255).astype(np.uint8)
    assert decoded(tmp_path / "f.tif").tolist() == expected.tolist()


@pytest.mark.parametrize(("value", "got"), [
    (2.0, r"range \[0, 2\]"), (-0.5, r"range \[-0.5, 0\]"), (float("nan"), "NaN or infinity"),
    (float("inf"), "NaN or infinity"), (1e30, r"range \[0, 1e\+30\]"),
])
def test_float_outside_0_1_is_refused_not_clipped(tmp_path, value, got):
    Image.fromarray(np.array([[0.0, value]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=rf"^image: expected .*float samples in \[0, 1\], got {got} in .*f\.tif$"):
        read_image(tmp_path / "f.tif")


# 8-bit modes -----------------------------------------------------------------------------------

def test_rgb_and_grey_8_bit_round_trip_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for suffix in ("png", "tif", "bmp"):
        Image.fromarray(rgb).save(tmp_path / f"rgb.{suffix}")
        assert np.array_equal(decoded(tmp_path / f"rgb.{suffix}"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    assert grey(decoded(tmp_path / "l.png")) == rgb[..., 0].tolist()


def test_bilevel(tmp_path):
    image = Image.new("1", (3, 1))
    image.putdata([0, 1, 0])
    image.save(tmp_path / "b.png")
    image.save(tmp_path / "b.tif")
    assert grey(decoded(tmp_path / "b.png")) == grey(decoded(tmp_path / "b.tif")) == [[0, 255, 0]]


@pytest.mark.parametrize(("transparency", "expected"), [
    (None, [[10, 20, 30], [0, 0, 0]]),
    (1, [[10, 20, 30], [255, 255, 255]]),  # index 1 fully transparent
    (bytes([255, 128]), [[10, 20, 30], [127, 127, 127]]),  # index 1 half transparent black
])
def test_palette_with_and_without_transparency(tmp_path, transparency, expected):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 0, 0, 0])
    image.putdata([0, 1])
    image.save(tmp_path / "p.png", **({} if transparency is None else {"transparency": transparency}))
    assert mode_of(tmp_path / "p.png") == "P"
    assert decoded(tmp_path / "p.png").tolist() == [expected]


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 0, 128), (128, 64, 0, 51)])
    image.save(tmp_path / "c.tif")
    assert mode_of(tmp_path / "c.tif") == "CMYK"
    # R = (255 - K)(1 - C/255): cyan, grey 127, and (102, 153, 204)
    assert decoded(tmp_path / "c.tif").tolist() == [[[0, 255, 255], [127, 127, 127], [102, 153, 204]]]


def test_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (3, 1))
    la.putdata([(200, 255), (0, 128), (50, 0)])
    la.save(tmp_path / "la.png")
    assert grey(decoded(tmp_path / "la.png")) == [[200, 127, 255]]
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(100, 50, 200, 64), (1, 2, 3, 255), (9, 9, 9, 0)])
    rgba.save(tmp_path / "rgba.png")
    # 255 - (255 - c)·a/255 for a = 64: (216, 204, 241)
    assert decoded(tmp_path / "rgba.png").tolist() == [[[216, 204, 241], [1, 2, 3], [255, 255, 255]]]


def test_cielab_is_refused(tmp_path):
    Image.new("LAB", (2, 2), (50, 0, 0)).save(tmp_path / "lab.tif")
    with pytest.raises(ValueError, match=r"^image: expected an RGB, grey, palette or CMYK image, got colour mode LAB"):
        read_image(tmp_path / "lab.tif")


def test_grey_tiff_with_three_unnamed_samples_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "m.tif", np.zeros((4, 4, 3), dtype=np.uint16), photometric="minisblack",
                     planarconfig="contig")
    with pytest.raises(ValueError, match=r"^image: expected grey, grey \+ alpha, RGB or RGB \+ alpha samples, "
                                         r"got 3 samples per pixel"):
        read_image(tmp_path / "m.tif")


# broken files -------------------------------------------------------------------------------

def _png_bytes(tmp_path) -> bytes:
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


@pytest.mark.parametrize("kind", ["truncated_png", "truncated_tiff", "garbage", "empty", "png_header_only",
                                  "folder"])
def test_broken_files_are_one_line_value_errors_naming_the_path(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "truncated_png":
        path.write_bytes(_png_bytes(tmp_path)[:300])
    elif kind == "truncated_tiff":
        path = tmp_path / "t.tif"
        tifffile.imwrite(tmp_path / "full.tif", RGB16, photometric="rgb")
        path.write_bytes((tmp_path / "full.tif").read_bytes()[:200])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png_header_only":
        path.write_bytes(_png_bytes(tmp_path)[:33])
    else:
        path.mkdir()
    with pytest.raises(ValueError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"image: expected a readable image file, got {path} (") and "\n" not in message


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^image: expected an existing image file, got .*nope\.png \(missing"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("size", [(15, 10), (20, 20)], ids=["over-limit-warning", "over-twice-limit-error"])
def test_decompression_bombs_are_refused_without_a_warning(tmp_path, monkeypatch, size):
    Image.new("RGB", size).save(tmp_path / "bomb.png")
    tifffile.imwrite(tmp_path / "bomb.tif", np.zeros((*size[::-1], 3), np.uint32), photometric="rgb")  # tifffile only
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("bomb.png", "bomb.tif"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"^image: expected at most 100 pixels.*bomb\.(png|tif)"):
                read_image(tmp_path / name)


def test_images_at_the_limit_are_read(tmp_path, monkeypatch):
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decoded(tmp_path / "ok.png")[0, 0].tolist() == [1, 2, 3]
