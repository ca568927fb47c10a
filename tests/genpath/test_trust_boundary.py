"""A model folder is untrusted input: loading one never runs its code, never leaves it, never goes online."""

import json
import shutil
import socket

import pytest
import torch

from genpath.encoders import SmallHistologyEncoder
from genpath.encoders.reference import load_encoder_reference, resolve_inside, save_encoder_reference
from tests.genpath.test_mask_pipeline import ldm_dir  # noqa: F401 - fixture


class WritesAFile(torch.nn.Module):
    """A TorchScript 'encoder' with a side effect: it writes a marker file when run."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(torch.zeros(1), self.marker)  # any side effect TorchScript allows
        return x.mean((2, 3))


@pytest.fixture
def scripted_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "marker.pt"
    torch.jit.script(WritesAFile(str(marker))).save(str(folder / "enc.pt"))
    (folder / "encoder.json").write_text(json.dumps({"name": "torchscript", "kwargs": {"path": "enc.pt",
                                                                                       "input_size": 8}}))
    return folder, marker


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_named_by_a_folder_is_never_loaded(scripted_folder, monkeypatch):
    folder, marker = scripted_folder
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.jit.load called"))
    with pytest.raises(ValueError, match="runs code from a file; genpath never runs code named by a model folder"):
        load_encoder_reference(folder)
    assert calls == [] and not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_explicit_trust_loads_torchscript(scripted_folder):
    folder, marker = scripted_folder
    encoder = load_encoder_reference(folder, allow_code=True)  # the user said so: probing runs it
    assert encoder.embed_dim == 3 and marker.exists()


@pytest.mark.parametrize("path", ["../outside", "../../../../etc", "/etc", "sub/../../x"])
def test_paths_outside_the_folder_are_refused(tmp_path, path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "encoder.json").write_text(json.dumps({"name": "genpath-small", "kwargs": {"path": path}}))
    with pytest.raises(ValueError, match="a model folder may only name its own files"):
        load_encoder_reference(folder)


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="expected a path inside"):
        resolve_inside(folder, "link", "encoder.json path")


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"kwargs": {}}', '{"name": 3}', '{"name": "x", "kwargs": 1}'])
def test_malformed_encoder_json_is_one_line(tmp_path, text):
    (tmp_path / "encoder.json").write_text(text)
    with pytest.raises(ValueError, match="encoder.json: expected") as info:
        load_encoder_reference(tmp_path)
    assert "\n" not in str(info.value)


def test_saved_references_stay_inside_or_are_hints(tmp_path):
    SmallHistologyEncoder(widths=(8, 16), embed_dim=12).save_pretrained(tmp_path / "encoder_outside")
    folder = tmp_path / "model"
    folder.mkdir()
    save_encoder_reference(folder, "genpath-small", {"path": tmp_path / "encoder_outside"})
    assert json.loads((folder / "encoder.json").read_text())["kwargs"] == {"path": "encoder"}  # copied in
    assert load_encoder_reference(folder).embed_dim == 12
    save_encoder_reference(folder, "timm.vit_small_patch16_224", {"checkpoint_path": str(tmp_path / "big.bin")})
    with pytest.raises(ValueError, match="outside"):
        load_encoder_reference(folder)
    save_encoder_reference(folder, "genpath-small", {"path": "samples/checkpoints/encoder_small"})
    assert json.loads((folder / "encoder.json").read_text()) == {"name": "genpath-small.samples", "kwargs": {}}


@pytest.mark.parametrize("library", ["os", "subprocess", "my_module", "transformers"])
def test_model_index_may_only_name_diffusers_or_genpath(ldm_dir, tmp_path, library):  # noqa: F811
    from genpath.pipelines import EmbeddingToImagePipeline

    folder = tmp_path / "pipe"
    shutil.copytree(ldm_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["projector"] = [library, "Anything"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"got projector from '{library}'"):
        EmbeddingToImagePipeline.from_pretrained(folder)


def test_pickled_weights_are_refused(ldm_dir, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from genpath.pipelines import EmbeddingToImagePipeline

    folder = tmp_path / "pipe"
    shutil.copytree(ldm_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")  # a pickle
    weights.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        EmbeddingToImagePipeline.from_pretrained(folder)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _loaders():
    from augment import HistAugTransform
    from genpath.encoders import create_encoder
    from genpath.models.vae import load_vae
    from genpath.pipelines import (
        EmbeddingToImagePipeline,
        ImageTranslationPipeline,
        MaskToImagePipeline,
        StainFuserNormalizer,
        StainTransferPipeline,
        Translator,
    )
    from normalization import StainNormalizer

    return {
        "EmbeddingToImagePipeline": EmbeddingToImagePipeline.from_pretrained,
        "MaskToImagePipeline": MaskToImagePipeline.from_pretrained,
        "StainTransferPipeline": StainTransferPipeline.from_pretrained,
        "ImageTranslationPipeline": ImageTranslationPipeline.from_pretrained,
        "StainFuserNormalizer": StainFuserNormalizer,
        "Translator": Translator,
        "HistAugTransform": HistAugTransform,
        "load_vae": load_vae,
        "genpath-small": lambda p: create_encoder("genpath-small", path=p),
        "StainNormalizer.load": StainNormalizer.load,
        "load_encoder_reference": load_encoder_reference,
    }


@pytest.mark.parametrize("loader", sorted(_loaders()))
def test_a_hub_id_fails_at_once_without_the_network(no_network, loader):
    """A name that is not a local path is an error at once: no Hub lookup, no retries."""
    import time

    start = time.perf_counter()
    with pytest.raises((FileNotFoundError, ValueError)):
        _loaders()[loader]("MahmoodLab/not-a-local-folder")
    assert time.perf_counter() - start < 5


def test_a_component_folder_linking_outside_is_refused(ldm_dir, tmp_path):  # noqa: F811
    from genpath.pipelines import EmbeddingToImagePipeline

    folder = tmp_path / "pipe"
    shutil.copytree(ldm_dir, folder)
    shutil.move(folder / "unet", tmp_path / "unet_elsewhere")
    (folder / "unet").symlink_to(tmp_path / "unet_elsewhere")
    with pytest.raises(ValueError, match=r"\['unet'\] linking outside"):
        EmbeddingToImagePipeline.from_pretrained(folder)
