"""SyntheticDataset over genpath synth's real outputs (zarr, PNG, --masks) feeding a DataLoader; card, sheet, report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from genpath.cli import app
from genpath.data import SyntheticDataset
from genpath.report.synth import (
    model_provenance,
    remove_synth_extras,
    write_contact_sheet,
    write_dataset_card,
    write_synth_extras,
)
from tests.conftest import SAMPLES
from tests.genpath.test_report import check_offline, parse

LDM = SAMPLES / "checkpoints" / "ldm_small"
CONTROLNET = SAMPLES / "checkpoints" / "controlnet_hgsc"


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    for path in sorted((SAMPLES / "tiles" / "pcam").glob("*"))[:2]:
        shutil.copy(path, folder)
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)  # a failed input row
    return folder


@pytest.fixture(scope="module")
def mask_file(tmp_path_factory) -> Path:
    with np.load(SAMPLES / "masks" / "hgsc_nest_heldout_tiles.npz") as data:
        instances, types = data["instances"][:2], data["types"][:2]
    path = tmp_path_factory.mktemp("masks") / "two.npz"
    np.savez(path, instances=instances, types=types)
    return path


def synth(out: Path, *args: str) -> Path:
    result = CliRunner().invoke(app, ["synth", "--steps", "2", "--out", str(out), *args])
    assert result.exit_code in (0, 1), result.output
    return out


def synth_images(factory, references: Path, output_format: str) -> Path:
    out = factory.mktemp(f"synth_{output_format}") / "out"
    return synth(out, "--model", str(LDM), "--from-images", str(references), "--n-per-condition", "2",
                 "--format", output_format)


@pytest.fixture(scope="module")
def synth_zarr(tmp_path_factory, references) -> Path:
    return synth_images(tmp_path_factory, references, "zarr")


@pytest.fixture(scope="module")
def synth_png(tmp_path_factory, references) -> Path:
    return synth_images(tmp_path_factory, references, "png")


@pytest.fixture(params=["zarr", "png"])
def synth_run(request) -> Path:
    return request.getfixturevalue(f"synth_{request.param}")


@pytest.fixture(scope="module", params=["zarr", "png"])
def mask_run(request, tmp_path_factory, mask_file) -> Path:
    out = tmp_path_factory.mktemp(f"masks_{request.param}") / "out"
    return synth(out, "--model", str(CONTROLNET), "--base", str(LDM), "--masks", str(mask_file), "--format",
                 request.param, "--n-per-condition", "1")


def test_synth_output_feeds_a_dataloader(synth_run):
    rows = [r for r in manifest(synth_run) if r["status"] == "done"]
    dataset = SyntheticDataset(synth_run)
    assert len(dataset) == len(rows) == 4 and len(dataset.failed) == 1  # 2 references x 2, one unreadable
    embeddings = np.load(synth_run / "embeddings.npy")
    item = dataset[3]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 64, 64)
    assert (item["id"], item["seed"], item["condition"]) == (3, 3, 1)
    assert item["reference"].endswith(Path(rows[3]["source"]).name)
    assert torch.equal(item["embedding"], torch.from_numpy(embeddings[1]))
    batch = next(iter(DataLoader(dataset, batch_size=4, num_workers=1)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["seed"].tolist() == [0, 1, 2, 3]
    assert batch["condition"].tolist() == [0, 0, 1, 1] and batch["embedding"].shape == (4, embeddings.shape[1])
    assert len(batch["reference"]) == 4


def test_zarr_and_png_outputs_hold_the_same_samples(synth_zarr, synth_png):
    a, b = SyntheticDataset(synth_zarr), SyntheticDataset(synth_png)
    assert len(a) == len(b) == 4
    for i in range(len(a)):  # same seeds: the same pixels (PNG is lossless)
        assert torch.equal(a[i]["image"], b[i]["image"]) and a[i]["seed"] == b[i]["seed"]


def test_mask_output_feeds_a_dataloader(mask_run, mask_file):
    dataset = SyntheticDataset(mask_run)
    assert len(dataset) == 2 and dataset.masks
    with np.load(mask_file) as data:
        instances, types = data["instances"], data["types"]
    item = dataset[1]
    assert torch.equal(item["instances"], torch.from_numpy(instances[1].astype(np.int64)))  # the input mask
    assert torch.equal(item["types"], torch.from_numpy(types[1].astype(np.int64)))
    assert item["reference"] == "two.npz[1]" and item["style"] == "" and "embedding" not in item
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["instances"].shape == (2, 64, 64)
    assert batch["seed"].tolist() == [0, 1]


def test_synth_extras_card_sheet_and_report(synth_run):
    written = write_synth_extras(synth_run, command_line=["genpath", "synth", "--model", str(LDM)])
    assert set(written) == {"contact_sheet", "report", "card"}
    card = (synth_run / "dataset_card.md").read_text()
    assert "EmbeddingToImagePipeline" in card and "licence | not recorded in the model folder" in card
    assert f"genpath synth --model {LDM}" in card and "seeded `0 + i`" in card
    assert "- samples: 4" in card and "- failed inputs: 1" in card and "- conditions: 2" in card
    assert "![contact sheet](contact_sheet.png)" in card
    sheet = Image.open(synth_run / "contact_sheet.png")
    assert sheet.size[0] == 4 * (64 + 2) + 2  # 4 samples in one row of 64 px cells
    page = parse(synth_run / "report.html")
    assert len(page.rows) == 5 and [r["class"] for r in page.rows].count("failed") == 1
    failed = next(r for r in page.rows if r["class"] == "failed")
    assert "zz_corrupt.jpg" in failed["text"]
    check_offline(page, synth_run)
    remove_synth_extras(synth_run)  # what --overwrite clears, nothing else
    assert not any((synth_run / name).exists() for name in ("dataset_card.md", "contact_sheet.png", "report.html",
                                                            "report"))
    assert len(SyntheticDataset(synth_run)) == 4


def test_mask_report_shows_masks(mask_run):
    write_synth_extras(mask_run)
    page = parse(mask_run / "report.html")
    assert len(page.rows) == 2 and all(len(r["images"]) == 2 for r in page.rows)  # image and instances
    assert "- masks: 2" in (mask_run / "dataset_card.md").read_text()
    check_offline(page, mask_run)


def test_card_reads_a_licence_from_the_model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# a model\n")
    (model / "model_index.json").write_text(json.dumps({"_class_name": "EmbeddingToImagePipeline"}))
    assert model_provenance(model)["licence"] == "cc-by-4.0"
    card = write_dataset_card(tmp_path / "out", model, {"seed": 5, "steps": 2}, {"samples": 3}, "genpath synth x")
    assert "cc-by-4.0 (from `README.md`)" in card.read_text() and "| steps | 2 |" in card.read_text()
    sheet = write_contact_sheet(torch.zeros(3, 3, 16, 16, dtype=torch.uint8), tmp_path / "s.png")
    assert Image.open(sheet).size == (3 * 18 + 2, 18 + 2)
    with pytest.raises(ValueError, match="images: expected at least one image"):
        write_contact_sheet([], tmp_path / "e.png")


def test_not_a_synth_folder_is_one_line(tmp_path, synth_run):
    cases = [(tmp_path / "missing", FileNotFoundError, "(missing)"),
             (SAMPLES / "images" / "he_hgsc_nest.jpg", FileNotFoundError, "(a file)"),
             (SAMPLES / "tiles", FileNotFoundError, "(no run.json)")]
    other = tmp_path / "normalized"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"created_by": "genpath normalize tiles", "settings": {}}))
    cases.append((other, ValueError, "not written by genpath synth"))
    empty = tmp_path / "empty"
    shutil.copytree(synth_run, empty, ignore=shutil.ignore_patterns("images", "images.zarr", "report*"))
    (empty / "manifest.csv").write_text("id,file,status\n")
    cases.append((empty, ValueError, "no finished samples"))
    gone = tmp_path / "gone"
    shutil.copytree(synth_run, gone, ignore=shutil.ignore_patterns("images", "images.zarr"))
    cases.append((gone, FileNotFoundError, "named by manifest.csv"))
    assert write_synth_extras(tmp_path / "missing") == {}  # logged, never raised: a finished run stays finished
    for folder, kind, detail in cases:
        with pytest.raises(kind) as error:
            SyntheticDataset(folder)
        message = str(error.value)
        assert message.startswith("out_dir: expected a genpath synth output folder") and detail in message
        assert "\n" not in message
