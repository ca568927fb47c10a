"""genpath preview augment|normalize: labelled grids, deterministic with a seed, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import augment
from augment.preview import TRANSFORMS, build_preview_transform, preview_grid
from genpath.cli import app
from genpath.report.grid import labelled_grid
from normalization.preview import normalize_preview_grid
from tests.conftest import SAMPLES

IMAGE = str(SAMPLES / "images" / "he_hgsc_nest.jpg")
TARGET = str(SAMPLES / "images" / "he_tiatoolbox_target.png")
runner = CliRunner()


def test_grid_geometry_and_labels_are_drawn():
    cells = [torch.full((3, 32, 32), 200, dtype=torch.uint8)] * 3
    plain = labelled_grid(cells, columns=2, cell_size=32, padding=6)
    assert tuple(plain.shape) == (3, 2 * 38 + 6, 2 * 38 + 6)
    labelled = labelled_grid(cells, ["one", "two", "three\nlines"], columns=2, cell_size=32, padding=6)
    assert labelled.shape[1] == plain.shape[1] + 2 * (2 * 12 + 4)  # two label lines per row
    label_band = labelled[:, 6 + 32 : 6 + 32 + 28, 6 : 6 + 32]
    assert int((label_band < 128).sum()) > 20  # dark text under the first cell
    with pytest.raises(ValueError, match="labels: expected one label per cell"):
        labelled_grid(cells, ["a"])


def test_preview_grid_is_deterministic_and_leaves_the_global_rng_alone(real_tiles):
    image = real_tiles[0]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, params, labels = preview_grid(image, transform="hed", n=5, seed=7, return_params=True)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert torch.equal(first, preview_grid(image, transform="hed", n=5, seed=7))
    assert not torch.equal(first, preview_grid(image, transform="hed", n=5, seed=8))
    assert labels[0] == "original" and len(labels) == 5
    assert params["hed_scale"].shape == (4, 3)
    scale = params["hed_scale"][0]
    assert labels[1].startswith(f"Hx{scale[0]:.2f} Ex{scale[1]:.2f} Dx{scale[2]:.2f}")  # values as drawn
    aug = augment.RandomHEDJitter(scale=0.05, shift=0.05, p=1.0)  # replay: the params reproduce the cells
    replayed = aug(image[None].float().div(255).expand(4, -1, -1, -1), params=params)
    cell = (replayed[0].clamp(0, 1) * 255).round().to(torch.uint8)  # 128 px tiles are not shrunk
    x0, y0 = 6 + 1 * (192 + 6) + (192 - 128) // 2, 6 + (192 - 128) // 2  # second cell of a 3-column grid
    assert torch.equal(first[:, y0 : y0 + 128, x0 : x0 + 128], cell)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_every_transform_previews(real_tiles, transform):
    grid, params, labels = preview_grid(real_tiles[1], transform=transform, n=3, seed=0, strength=0.5,
                                        return_params=True)
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3 and len(labels) == 3
    assert all(label for label in labels)
    assert hasattr(augment, "preview_grid")
    aug = build_preview_transform(transform, 0.5, real_tiles[1].float() / 255)
    assert aug.p == 1.0


def test_strength_zero_is_the_identity(real_tiles):
    grid = preview_grid(real_tiles[2], transform="histology", n=2, strength=0.0, seed=0, original=False,
                        columns=2)
    half = grid.shape[2] // 2
    left, right = grid[:, :, :half], grid[:, :, half : 2 * half]
    # dihedral and crop position are not strengths: compare colour statistics, not pixels
    assert torch.allclose(left.float().mean((1, 2)), right.float().mean((1, 2)), atol=1.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"transform": "blur"}, "transform: expected one of hed, stain, stainna, histology, got 'blur'"),
    ({"n": 0}, "n: expected an integer in [1, 256], got 0"),
    ({"n": 2.5}, "n: expected an integer in [1, 256], got 2.5"),
    ({"strength": float("nan")}, "strength: expected a finite number in [0, 10] for hed, got nan"),
    ({"strength": -1.0}, "strength: expected a finite number in [0, 10] for hed, got -1.0"),
    ({"transform": "histology", "strength": 2.0}, "strength: expected a finite number in [0, 1] for histology"),
    ({"seed": -1}, "seed: expected an integer in [0, 2**63), got -1"),
])
def test_bad_arguments_are_one_line_errors(real_tiles, kwargs, message):
    with pytest.raises(ValueError) as error:
        preview_grid(real_tiles[0], **kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_cli_preview_augment_writes_a_labelled_grid(tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["preview", "augment", IMAGE, "--n", "16", "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] > 4 * 192 and grid.shape[1] == 4 * 198 + 6  # 4 x 4 cells of 192 px + labels
    again = tmp_path / "again.png"
    runner.invoke(app, ["preview", "augment", IMAGE, "--n", "16", "--seed", "3", "--out", str(again)])
    assert np.array_equal(grid, np.asarray(Image.open(again)))


@pytest.mark.parametrize(("args", "message"), [
    (["--transform", "nope"], "error: transform: expected one of hed, stain, stainna, histology, got 'nope'"),
    (["--n", "0"], "error: n: expected an integer in [1, 256], got 0"),
    (["--n", "1000"], "error: n: expected an integer in [1, 256], got 1000"),
    (["--strength", "nan"], "error: strength: expected a finite number in [0, 10] for hed, got nan"),
    (["--strength", "inf"], "error: strength: expected a finite number in [0, 10] for hed, got inf"),
    (["--transform", "histology", "--strength", "3"], "error: strength: expected a finite number in [0, 1]"),
])
def test_cli_preview_errors_are_one_line(tmp_path, args, message):
    out = tmp_path / "g.png"
    result = runner.invoke(app, ["preview", "augment", IMAGE, *args, "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.output
    assert not out.exists()


def test_cli_preview_missing_image_and_bad_out(tmp_path):
    result = runner.invoke(app, ["preview", "augment", str(tmp_path / "none.jpg"), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and "error: image: expected an existing image file" in result.output
    result = runner.invoke(app, ["preview", "augment", IMAGE, "--out", str(tmp_path / "g.txt")])
    assert result.exit_code == 2 and "error: out: expected a .png or .jpg file name" in result.output


def test_normalize_preview_grid_and_cli(tmp_path, real_tiles):
    target = real_tiles[4]
    grid = normalize_preview_grid([real_tiles[0], real_tiles[1]], ["macenko", "reinhard"], target, cell_size=64)
    assert grid.shape[2] == 3 * (64 + 6) + 6  # original + 2 methods
    assert grid.shape[1] > 3 * 64  # the target row, then one row per image
    with pytest.raises(ValueError, match=r"^methods: expected names from .*got 'nope'"):
        normalize_preview_grid([real_tiles[0]], ["nope"], target)
    out = tmp_path / "n.png"
    result = runner.invoke(app, ["preview", "normalize", str(SAMPLES / "tiles" / "crc"), "--method", "macenko",
                                 "--method", "vahadane", "--target", TARGET, "--size", "96", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] == 3 * 198 + 6
    bad = runner.invoke(app, ["preview", "normalize", IMAGE, "--method", "nope", "--target", TARGET, "--out",
                              str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and bad.output.startswith("error: method: expected names from")
