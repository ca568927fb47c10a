"""genpath embed: embeddings equal to the encoder's, resume, growth, bags per slide, training datasets, errors."""

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from genpath.apps.embed_dataset import EmbedConfig, export_bags, parse_encoder, run_embed
from genpath.cli import app
from genpath.encoders import create_encoder
from genpath.io.synthetic_slide import write_synthetic_slide
from genpath.training.configs import DataSettings
from genpath.training.data import ZarrTileDataset, write_tile_zarr
from genpath.wsi.tile_dataset import TileDatasetConfig, run_tile_dataset

runner = CliRunner()
ENCODER = "genpath-small.samples"


@pytest.fixture(scope="module")
def slides(tmp_path_factory, patches):
    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "a.svs", 512, 384, patches, kind="svs", tile=256, mpp=0.5, seed=3)
    write_synthetic_slide(folder / "b.svs", 384, 384, patches, kind="svs", tile=256, mpp=0.5, seed=5,
                          tissue_share=0.6)
    (folder / "broken.svs").write_bytes(b"II*\x00 not a slide")
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, slides):
    """A dataset of a.svs, broken.svs (failed) and b.svs: 12 32-px tiles each at 1 µm/px."""
    path = tmp_path_factory.mktemp("ds") / "d.zarr"
    inputs = [str(slides / n) for n in ("a.svs", "broken.svs", "b.svs")]
    run_tile_dataset(TileDatasetConfig(inputs, str(path), mpp=1.0, tile_size=32, min_tissue=0.3,
                                       max_tiles_per_slide=12))
    return path


@pytest.fixture(scope="module")
def encoder():
    return create_encoder(ENCODER)


def copy(dataset, tmp_path):
    import shutil

    return shutil.copytree(dataset, tmp_path / "d.zarr")


def test_embeddings_equal_the_encoder_on_the_tiles(tmp_path, dataset, encoder):
    path = copy(dataset, tmp_path)
    report = run_embed(EmbedConfig(str(path), ENCODER, batch_size=7, device="cpu"))
    group = zarr.open_group(str(path), mode="r")
    n = group.attrs["n_tiles"]
    stored = group["embeddings"][ENCODER]
    with torch.no_grad():
        want = encoder(torch.from_numpy(group["images"][:])).numpy()
    assert n == 24 and stored.shape == (n, encoder.embed_dim) and stored.dtype == np.float32
    np.testing.assert_allclose(stored[:], want, atol=1e-5, rtol=1e-4)
    assert stored.attrs["done"] == n and stored.attrs["encoder"] == ENCODER and report["computed"] == n
    again = run_embed(EmbedConfig(str(path), ENCODER, batch_size=7, device="cpu"))
    assert again["computed"] == 0


def test_an_interrupted_embed_continues_to_the_same_array(tmp_path, dataset):
    path = copy(dataset, tmp_path)
    run_embed(EmbedConfig(str(copy(dataset, tmp_path / "r")), ENCODER, batch_size=5, device="cpu"))
    reference = zarr.open_group(str(tmp_path / "r" / "d.zarr"), mode="r")["embeddings"][ENCODER][:]

    def stop_after_two_batches(done, total):
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(EmbedConfig(str(path), ENCODER, batch_size=5, device="cpu"), progress=stop_after_two_batches)
    assert zarr.open_group(str(path), mode="r")["embeddings"][ENCODER].attrs["done"] == 10
    report = run_embed(EmbedConfig(str(path), ENCODER, batch_size=5, device="cpu"))
    assert report["computed"] == report["n_tiles"] - 10
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["embeddings"][ENCODER][:], reference)


def test_float16_and_other_settings_under_one_name(tmp_path, dataset):
    path = copy(dataset, tmp_path)
    run_embed(EmbedConfig(str(path), ENCODER, device="cpu", dtype="float16"))
    assert zarr.open_group(str(path), mode="r")["embeddings"][ENCODER].dtype == np.float16
    with pytest.raises(ValueError, match="dtype: expected float16 as in .*pass --overwrite"):
        run_embed(EmbedConfig(str(path), ENCODER, device="cpu"))
    run_embed(EmbedConfig(str(path), ENCODER, device="cpu", overwrite=True))
    assert zarr.open_group(str(path), mode="r")["embeddings"][ENCODER].dtype == np.float32


def test_a_grown_dataset_embeds_only_its_new_rows(tmp_path, slides):
    path = tmp_path / "d.zarr"
    settings = dict(mpp=1.0, tile_size=32, min_tissue=0.3)
    run_tile_dataset(TileDatasetConfig([str(slides / "a.svs")], str(path), **settings))
    first = run_embed(EmbedConfig(str(path), ENCODER, device="cpu"))
    run_tile_dataset(TileDatasetConfig([str(slides / "b.svs")], str(path), **settings))
    second = run_embed(EmbedConfig(str(path), ENCODER, device="cpu"))
    assert second["computed"] == second["n_tiles"] - first["n_tiles"] > 0


def test_bags_hold_each_slides_rows(tmp_path, dataset):
    path = copy(dataset, tmp_path)
    report = run_embed(EmbedConfig(str(path), ENCODER, device="cpu", bags=str(tmp_path / "bags")))
    group = zarr.open_group(str(path), mode="r")
    slides = {s["path"].rsplit("/", 1)[1]: s for s in group.attrs["slides"]}
    assert sorted(p.name for p in report["bags"]) == ["a.pt", "b.pt"]  # the failed slide has no bag
    for name in ("a", "b"):
        bag = torch.load(tmp_path / "bags" / f"{name}.pt", weights_only=True)
        row = slides[f"{name}.svs"]
        rows = slice(row["offset"], row["offset"] + row["n_tiles"])
        assert set(bag) == {"features", "coords"} and bag["features"].dtype == torch.float32
        assert bag["features"].shape == (row["n_tiles"], 256) and bag["coords"].shape == (row["n_tiles"], 2)
        np.testing.assert_array_equal(bag["features"].numpy(), group["embeddings"][ENCODER][rows])
        np.testing.assert_array_equal(bag["coords"].numpy(), group["coords"][rows])
        assert (group["slide_index"][rows] == list(slides).index(f"{name}.svs")).all()
    with pytest.raises(ValueError, match="embeddings: expected embeddings/other"):
        export_bags(path, "other", tmp_path / "bags")


def test_training_datasets_read_tiles_and_embeddings(tmp_path, dataset):
    path = copy(dataset, tmp_path)
    run_embed(EmbedConfig(str(path), ENCODER, device="cpu"))
    group = zarr.open_group(str(path), mode="r")
    tiles = ZarrTileDataset(path)
    assert len(tiles) == group.attrs["n_tiles"] and torch.equal(tiles[3], torch.from_numpy(group["images"][3]))
    pairs = DataSettings(zarr=str(path), embeddings=ENCODER, size=16).dataset()
    tile, embedding = pairs[3]
    assert torch.equal(tile, torch.from_numpy(group["images"][3][:, 8:24, 8:24]))  # center crop
    assert embedding.dtype == torch.float32
    assert torch.equal(embedding, torch.from_numpy(group["embeddings"][ENCODER][3]))
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[1].shape == (4, 256)
    with pytest.raises(ValueError, match="data.embeddings: expected 'zarr'"):
        DataSettings(embeddings=ENCODER)
    with pytest.raises(ValueError, match="data.embeddings: expected embeddings/nope"):
        ZarrTileDataset(path, embeddings="nope")
    with pytest.raises(ValueError, match="data.size: expected at most the tile size 32"):
        ZarrTileDataset(path, size=64)


def test_old_tiles_array_and_channels_last_layout(tmp_path):
    tiles = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(ZarrTileDataset(write_tile_zarr(tiles, tmp_path / "old.zarr"))[1], tiles[1])
    group = zarr.open_group(str(tmp_path / "nhwc.zarr"), mode="w")
    group.create_array("images", shape=(3, 16, 16, 3), chunks=(1, 16, 16, 3), dtype="uint8")[:] = \
        tiles.permute(0, 2, 3, 1).numpy()
    assert torch.equal(ZarrTileDataset(tmp_path / "nhwc.zarr")[2], tiles[2])


def test_a_partial_embedding_is_refused_for_training(tmp_path, dataset):
    path = copy(dataset, tmp_path)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_embed(EmbedConfig(str(path), ENCODER, batch_size=4, device="cpu"), progress=stop)
    with pytest.raises(ValueError, match=r"data.embeddings: expected \d+ rows .* got 4"):
        ZarrTileDataset(path, embeddings=ENCODER)


def test_encoder_names_with_weights():
    assert parse_encoder("genpath-small.samples") == ("genpath-small.samples", {})
    assert parse_encoder("torchscript:/m.pt") == ("torchscript", {"path": "/m.pt"})
    with pytest.raises(ValueError, match="encoder: expected NAME or NAME:WEIGHTS"):
        parse_encoder("genpath-small:")


def test_cli_tiles_then_embed(tmp_path, slides):
    out = tmp_path / "d.zarr"
    result = runner.invoke(app, ["tiles", str(slides / "a.svs"), "--out", str(out), "--mpp", "1.0", "--tile-size",
                                 "32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["embed", str(out), "--encoder", ENCODER, "--device", "cpu", "--bags",
                                 str(tmp_path / "bags")])
    assert result.exit_code == 0 and f"embeddings/{ENCODER}" in result.output and "1 bags in" in result.output


def test_hostile_embed_inputs_are_one_line(tmp_path, dataset):
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    (tmp_path / "plain.zarr").mkdir()
    cases = [
        (["--encoder", "nope"], "error: encoder: expected one of"),
        (["--encoder", "genpath-small:" + str(tmp_path / "missing")], "error: path: expected a local"),
        (["--encoder", ENCODER, "--batch-size", "0"], "error: batch-size: expected 1..65536"),
        (["--encoder", ENCODER, "--dtype", "int8"], "error: dtype: expected float32 or float16"),
        (["--encoder", ENCODER, "--device", "tpu"], "error: device: expected auto, cpu"),
        (["--encoder", ENCODER, "--bags", str(afile)], "error: bags: expected a folder"),
        (["--encoder", ENCODER, "--bags-format", "csv"], "error: bags-format: expected pt or h5"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["embed", str(dataset), *extra])
        assert result.exit_code == 2 and result.output.startswith(message), (extra, result.output)
        assert result.output.count("\n") == 1
    for target in (tmp_path / "plain.zarr", afile, tmp_path / "missing.zarr"):
        result = runner.invoke(app, ["embed", str(target), "--encoder", ENCODER])
        assert result.exit_code == 2 and result.output.startswith("error: dataset: expected a tile dataset"), \
            result.output
    assert afile.read_bytes() == b"mine" and "embeddings" not in zarr.open_group(str(dataset), mode="r")
