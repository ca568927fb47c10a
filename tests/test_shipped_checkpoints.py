"""The small checkpoints in samples/checkpoints load (fp16 -> float32) and run end to end on CPU."""

import numpy as np
import torch

from genpath.io.images import read_image
from tests.conftest import ROOT

CK = ROOT / "samples" / "checkpoints"
PCAM = sorted((ROOT / "samples" / "tiles" / "pcam").glob("*.jpg"))


def test_vae_small_reconstructs_real_tiles():
    from genpath.models.vae import decode_tiled, encode_tiled, load_vae

    vae = load_vae(str(CK / "vae_small"))
    tiles = torch.stack([read_image(p)[:, :64, :64] for p in PCAM[:4]]).float() / 255
    with torch.no_grad():
        recon = decode_tiled(vae, encode_tiled(vae, tiles))
    assert next(vae.parameters()).dtype == torch.float32
    assert float((recon - tiles).abs().mean()) < 0.12  # a blurry but faithful reconstruction


def test_ldm_small_generates_from_a_real_tile_embedding():
    from genpath.pipelines import EmbeddingToImagePipeline
    from genpath.synth import pipeline_encoder

    pipe = EmbeddingToImagePipeline.from_pretrained(CK / "ldm_small")
    encoder = pipeline_encoder(CK / "ldm_small")
    with torch.no_grad():
        emb = encoder(read_image(PCAM[0])[None])
    images = pipe(emb, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_stainfuser_small_normalizes_and_keeps_white_tiles():
    from genpath.pipelines import StainFuserNormalizer

    target = read_image(ROOT / "samples" / "images" / "he_tiatoolbox_target.png")[:, :256, :256]
    norm = StainFuserNormalizer(CK / "stainfuser_small", num_inference_steps=1).fit(target)
    tiles = torch.stack([read_image(PCAM[0]), torch.full((3, 96, 96), 250, dtype=torch.uint8)])
    out, valid = norm(tiles, return_valid=True)
    assert out.shape == tiles.shape and out.dtype == torch.uint8 and valid.tolist() == [True, False]
    assert torch.equal(out[1], tiles[1])


def test_controlnet_hgsc_generates_from_the_shipped_masks():
    from genpath.pipelines import MaskToImagePipeline

    pipe = MaskToImagePipeline.from_pretrained(CK / "controlnet_hgsc", base=CK / "ldm_small")
    data = np.load(ROOT / "samples" / "masks" / "hgsc_nest_heldout_tiles.npz")
    inst, types = torch.from_numpy(data["instances"][:2]), torch.from_numpy(data["types"][:2])
    images = pipe(inst, types, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_histaug_small_augments_embeddings_of_its_encoder():
    from augment import HistAugTransform
    from genpath.encoders.reference import load_encoder_reference

    encoder = load_encoder_reference(CK / "histaug_small")
    with torch.no_grad():
        bag = encoder(torch.stack([read_image(p) for p in PCAM[:8]]))
    torch.manual_seed(0)
    out = HistAugTransform(CK / "histaug_small", p=1.0)(bag)
    assert out.shape == bag.shape and torch.isfinite(out).all() and not torch.equal(out, bag)
    assert torch.equal(HistAugTransform(CK / "histaug_small", p=0.0)(bag), bag)


def test_shipped_pipelines_load_through_one_quiet_path():
    import warnings

    from genpath.pipelines import EmbeddingToImagePipeline, MaskToImagePipeline, StainTransferPipeline

    for cls, name, kwargs in ((EmbeddingToImagePipeline, "ldm_small", {}),
                              (StainTransferPipeline, "stainfuser_small", {}),
                              (MaskToImagePipeline, "controlnet_hgsc", {"base": CK / "ldm_small"})):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fp16 -> float32 through dtype=, no deprecation warning
            pipe = cls.from_pretrained(CK / name, **kwargs)
        assert type(pipe) is cls and pipe._progress_bar_config == {"disable": True}
        assert all(p.dtype == torch.float32 for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                   for p in m.parameters())
