import numpy as np
import pytest

from genpath.tiling import TileGrid, feather_weights, iter_strips
from genpath.tissue import detect_tissue, tile_tissue_fraction


def gradient_image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([90 + 0.08 * xx, 110 + 0.06 * yy, 160 + 0.02 * (xx - yy)], -1).round().astype(np.uint8)


def reader_for(image):
    h, w = image.shape[:2]

    def read(x, y, ww, hh):
        out = np.full((hh, ww, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + ww, w), min(y + hh, h)
        out[y0 - y : y1 - y, x0 - x : x1 - x] = image[y0:y1, x0:x1]
        return out

    return read


def tile_dependent_toy(windows):
    """A deliberately tile-dependent 'normalizer': brightness shift from the window's own content."""
    centre = windows[:, windows.shape[1] // 4 : -windows.shape[1] // 4, windows.shape[2] // 4 : -windows.shape[2] // 4]
    shift = (centre.reshape(len(windows), -1).mean(1) - 128.0) * 8.0
    return np.clip(windows.astype(np.float32) + shift[:, None, None, None], 0, 255)


def run(image, tile, overlap, process, **kw):
    grid = TileGrid(image.shape[1], image.shape[0], tile, overlap)
    strips = list(iter_strips(reader_for(image), grid, process, **kw))
    assert [row for row, _ in strips] == list(range(grid.rows))
    return np.concatenate([s for _, s in strips], 0)


def boundary_step(image, output):
    """Largest jump of the correction field (output − input) between neighbouring pixels."""
    correction = output.astype(np.float32) - image
    return max(np.abs(np.diff(correction, axis=0)).max(), np.abs(np.diff(correction, axis=1)).max())


def test_feather_weights_partition_of_unity():
    for kind in ("cosine", "linear"):
        w = feather_weights(128 + 64, 32, kind)
        assert (w > 0).all() and w.max() == 1.0
        np.testing.assert_allclose(w[128:] + w[:64], 1.0, atol=1e-6)


@pytest.mark.parametrize("tile, overlap", [(128, 0), (128, 32), (96, 48), (64, 8)])
def test_identity_processor_reproduces_image(tile, overlap):
    image = gradient_image(333, 517)
    out = run(image, tile, overlap, lambda b: b)
    assert out.shape == image.shape and (out == image).all()


def test_overlap_blending_cuts_largest_boundary_step_10x():
    image = gradient_image(640, 768)
    no_overlap = boundary_step(image, run(image, 128, 0, tile_dependent_toy))
    blended = boundary_step(image, run(image, 128, 32, tile_dependent_toy))
    assert no_overlap > 20  # the toy really is tile dependent
    assert blended * 10 <= no_overlap, (no_overlap, blended)


def test_background_windows_skip_the_processor():
    image = gradient_image(256, 384)
    calls = []

    def process(batch):
        calls.append(len(batch))
        return 255 - batch

    out = run(image, 128, 0, process, is_foreground=lambda r, c: c == 1)
    assert sum(calls) == 2
    assert (out[:, 128:256] == 255 - image[:, 128:256]).all()
    assert (out[:, :128] == image[:, :128]).all() and (out[:, 256:] == image[:, 256:]).all()


def test_skip_set_avoids_reading_done_tiles():
    image = gradient_image(256, 256)
    reads = []
    grid = TileGrid(256, 256, 128, 0)

    def read(x, y, w, h):
        reads.append((x, y))
        return reader_for(image)(x, y, w, h)

    list(iter_strips(read, grid, lambda b: b, skip={(0, 0), (0, 1)}))
    assert sorted(reads) == [(0, 128), (128, 128)]


def test_batches_respect_batch_size():
    sizes = []
    run(gradient_image(256, 640), 128, 0, lambda b: sizes.append(len(b)) or b, batch_size=2)
    assert max(sizes) == 2 and sum(sizes) == 10


def test_grid_rejects_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        TileGrid(100, 100, 64, 40)


def test_detect_tissue_finds_stained_blob_not_glass():
    rng = np.random.default_rng(0)
    rgb = np.clip(np.full((120, 160, 3), 240) + rng.integers(-4, 5, (120, 160, 3)), 0, 255).astype(np.uint8)
    rgb[30:90, 40:120] = (170, 80, 150)
    rgb[5, 5] = (150, 60, 140)  # speck of dust
    mask = detect_tissue(rgb)
    assert mask[30:90, 40:120].mean() > 0.95
    assert mask[:20].sum() == 0
    assert 0.95 < tile_tissue_fraction(mask, 4.0, (200, 160), (200, 160)) <= 1.0


def test_detect_tissue_on_empty_glass_finds_nothing():
    rng = np.random.default_rng(1)
    glass = np.clip(240 + rng.integers(-6, 7, (80, 80, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(glass).sum() == 0


def test_detect_tissue_rejects_bad_shape():
    with pytest.raises(ValueError, match="rgb"):
        detect_tissue(np.zeros((10, 10)))
