"""Generated nuclei masks (classical segmenter) as ControlNet training sources, and the consistency loss."""

import numpy as np
import pytest
import torch
from PIL import Image

from genpath.metrics.nuclei import haematoxylin, haematoxylin_foreground, segment_nuclei
from genpath.training.mask_data import MaskTileDataset, expand_mask_sources
from tests.genpath.test_mask_pipeline import ldm_dir  # noqa: F401, F811 - the tiny saved LDM fixture

PURPLE, PINK = (70, 40, 130), (235, 200, 215)


def blobs(size=96, centres=((20, 20), (20, 70), (70, 45)), radius=7):
    """A pink tile with dark purple discs at ``centres``: an H&E cartoon with known nuclei."""
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PINK
    for cy, cx in centres:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = PURPLE
    return image


def test_segment_nuclei_finds_each_disc_and_nothing_in_flat_tissue():
    labels = segment_nuclei(blobs(), min_area=20)
    assert labels.dtype == np.int32 and int(labels.max()) == 3
    for cy, cx in ((20, 20), (20, 70), (70, 45)):
        assert labels[cy, cx] > 0
    assert labels[45, 5] == 0 and labels[90, 90] == 0
    assert len({int(labels[c]) for c in ((20, 20), (20, 70), (70, 45))}) == 3  # one label per disc
    flat = np.full((32, 32, 3), 200, np.uint8)
    assert segment_nuclei(flat).max() == 0
    noisy = (np.random.default_rng(0).normal(200, 2, (32, 32, 3))).clip(0, 255).astype(np.uint8)
    assert segment_nuclei(noisy, contrast=0.05).max() == 0  # two Otsu classes of the same stain: no nuclei


def test_touching_nuclei_are_split_by_the_watershed():
    labels = segment_nuclei(blobs(centres=((40, 34), (40, 54)), radius=10), min_area=20, min_distance=6)
    assert labels[40, 30] != labels[40, 58] and labels[40, 30] > 0 and labels[40, 58] > 0


def test_haematoxylin_foreground_matches_skimage_rule():
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    image = blobs()
    h = rgb2hed(image)[..., 0]
    np.testing.assert_allclose(haematoxylin(image), h)
    assert np.array_equal(haematoxylin_foreground(image[None])[0], h > threshold_otsu(h))
    assert not haematoxylin_foreground(np.full((1, 8, 8, 3), 128, np.uint8)).any()
    with pytest.raises(ValueError, match="images: expected a batch"):
        haematoxylin_foreground(image)
    with pytest.raises(ValueError, match="min_distance"):
        segment_nuclei(image, min_distance=0)


@pytest.fixture()
def he_folder(tmp_path):
    folder = tmp_path / "he"
    (folder / "sub").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(blobs()).save(folder / ("sub" if i % 2 else ".") / f"tile{i}.png")
    return folder


def test_generated_source_segments_at_load_with_empty_types(he_folder):
    data = MaskTileDataset([{"generated": str(he_folder), "crops": 3}], 64, seed=1)
    assert len(data.entries) == 6 and len(data) == 18  # folders are searched recursively
    image, inst, types = data.load(0)
    assert image.shape == (3, 96, 96) and int(inst.max()) == 3 and int(types.abs().sum()) == 0
    crop, ci, ct = data[5]
    y, x = data.crop_box(5)
    assert torch.equal(crop, image[:, y : y + 64, x : x + 64]) and torch.equal(ci, inst[y : y + 64, x : x + 64])
    assert data.entry_of(5) == 1 and data.first_item(2) == 6


def test_generated_source_holdout_limit_scale_and_mixed_crops(he_folder):
    from genpath.training.data import in_holdout

    entries = expand_mask_sources([{"generated": str(he_folder), "holdout": 0.5}])
    kept = {e["image"].name for e in entries}
    assert kept == {f"tile{i}.png" for i in range(6) if not in_holdout(f"tile{i}.png", 0.5)}
    assert len(expand_mask_sources([{"generated": str(he_folder), "limit": 2}])) == 2
    images = he_folder.parent
    real = {"image": str(he_folder / "tile0.png"), "instances": str(images / "inst.npz")}
    np.savez(images / "inst.npz", nuc_raster=(segment_nuclei(blobs(), min_area=20)).astype(np.int32))
    data = MaskTileDataset([real, {"generated": str(he_folder / "tile0.png"), "scale": 2.0, "crops": 5}], 64,
                           crops_per_image=2)
    assert len(data) == 2 + 5 and [data.entry_of(i) for i in (0, 1, 2, 6)] == [0, 0, 1, 1]
    assert data.load(1)[0].shape == (3, 192, 192) and int(data.load(1)[1].max()) == 3  # segmented after scaling
    assert torch.equal(data.load(0)[1] > 0, torch.from_numpy(segment_nuclei(blobs(), min_area=20) > 0))


@pytest.mark.parametrize(("spec", "message"), [
    ({"generated": "{folder}", "holdout": 1.5}, "holdout: expected a number in"),
    ({"generated": "{folder}", "limit": 0}, "limit: expected an integer in"),
    ({"generated": "{folder}", "min_area": "big"}, "min_area: expected an integer"),
    ({"generated": "{folder}", "types": "x.npz"}, "unknown keys \\['types'\\]"),
    ({"generated": "{folder}", "crops": 2.5}, "crops: expected an integer"),
    ({"generated": "{folder}/missing"}, "expected an H&E image or a folder"),
    ({"image": "a.png"}, "expected keys image\\+instances"),
])
def test_bad_generated_sources_are_one_line_errors(he_folder, spec, message):
    spec = {k: v.format(folder=he_folder) if isinstance(v, str) else v for k, v in spec.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        expand_mask_sources([spec])


def test_haematoxylin_density_and_consistency_loss():
    from skimage.color import rgb2hed

    from genpath.training.controlnet import consistency_loss, haematoxylin_density

    image = blobs()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    np.testing.assert_allclose(haematoxylin_density(x)[0].numpy(), rgb2hed(image)[..., 0].clip(0), atol=1e-5)
    fg = torch.from_numpy(haematoxylin_foreground(image[None])).float()
    swapped = torch.from_numpy(blobs(centres=((50, 20), (70, 80)))).permute(2, 0, 1)[None].float() / 255
    good = consistency_loss(x, x, fg, torch.ones(1))
    bad = consistency_loss(swapped, x, fg, torch.ones(1))
    assert float(good) < 0.2 and float(bad) > 0.8  # soft map: 0.98 on nuclei, 0.02 on background
    generated = x.clone().requires_grad_(True)
    consistency_loss(generated, x, fg, torch.ones(1)).backward()
    assert generated.grad is not None and torch.isfinite(generated.grad).all()
    both = consistency_loss(torch.cat([x, swapped]), torch.cat([x, x]), torch.cat([fg, fg]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(both, good)  # a zero weight removes a sample


def test_train_controlnet_with_generated_masks_init_and_consistency(ldm_dir, he_folder, tmp_path):  # noqa: F811
    import json

    from genpath.pipelines.mask_to_image import MaskToImagePipeline, controlnet_from_unet, export_controlnet
    from genpath.training.configs import TrainConfig
    from genpath.training.controlnet import _init_controlnet, train_controlnet

    def config(out, steps, **options):
        return TrainConfig.from_dict({
            "data": {"masks": [{"generated": str(he_folder), "limit": 2}], "size": 32, "mask_scale": 0.5,
                     "crops_per_image": 4},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 2, "checkpoint_every": 1,
                      "log_every": 1, "sample_every": 100},
            "options": {"pipeline": str(ldm_dir), "num_types": 3, **options}})

    first = train_controlnet(config(tmp_path / "a", 1))
    second = train_controlnet(config(tmp_path / "b", 2, init=str(first), consistency_weight=0.5))
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "consistency"} <= set(records[-1]) and 0 <= records[-1]["consistency"] <= 1
    assert abs(records[-1]["loss"] - records[-1]["mse"] - 0.5 * records[-1]["consistency"]) < 1e-4
    trained = MaskToImagePipeline.from_pretrained(first).controlnet
    fresh = controlnet_from_unet(MaskToImagePipeline.from_pretrained(first).unet, 2, 3)
    loaded = _init_controlnet(first, fresh).state_dict()  # the pipeline folder's controlnet/ ...
    assert all(torch.equal(v, loaded[k]) for k, v in trained.state_dict().items())
    export_controlnet(first, ldm_dir, tmp_path / "shipped")  # ... or a shipped (fp16) ControlNet folder
    shipped = _init_controlnet(tmp_path / "shipped", fresh)
    assert next(shipped.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="conditioning channels"):
        _init_controlnet(first, controlnet_from_unet(MaskToImagePipeline.from_pretrained(first).unet, 2, 1))
    assert MaskToImagePipeline.from_pretrained(second).config.num_types == 3
    with pytest.raises(ValueError, match="consistency_weight"):
        train_controlnet(config(tmp_path / "d", 1, consistency_weight=-1.0))
    with pytest.raises(FileNotFoundError, match="options.init"):
        train_controlnet(config(tmp_path / "e", 1, init=str(tmp_path / "nothing")))


def test_nuclei_module_examples_run():
    import doctest

    import genpath.metrics.nuclei as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 2 and result.failed == 0
