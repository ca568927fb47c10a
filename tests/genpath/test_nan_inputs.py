"""NaN, infinity and absurd magnitudes never pass a pipeline or a normalizer state (issue 21, item 3).

Each pipeline is the tiny seeded model its own tests build; every bad value must raise a one-line
``ValueError`` naming the argument before any compute (a NaN that passed used to give a black image).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from genpath.pipelines.checks import MAX_CONDITIONING_VALUE, check_number, check_steps
from genpath.pipelines.image_translation import GeneratorTranslationPipeline
from genpath.pipelines.large_image import generate_large_image
from genpath.translation.networks import ResnetTranslator
from normalization import MacenkoNormalizer, ReinhardNormalizer, StainNormalizer, VahadaneNormalizer
from tests.genpath.test_mask_pipeline import ldm_dir, mask_pipe, masks  # noqa: F401 - fixtures
from tests.genpath.test_pipeline import pipe  # noqa: F401 - fixture
from tests.genpath.test_translation import tiny_latent_pipeline
from tests.normalization.test_stainfuser import he_tiles, tiny_pipeline

NAN, INF = float("nan"), float("inf")
BAD_STEPS = [0, -1, NAN, INF, 2.5, 2.0, True, "4", None]
BAD_GUIDANCE = [NAN, INF, -INF, -1.0, -1e-9, 1e30, 101.0, "2", None, True]
BAD_CONTROLNET_SCALE = [NAN, INF, -INF, -0.5, 1e30, 101.0, "1", None]
BAD_CONDITIONING = [NAN, INF, -INF, 1e30, -1e30, 2 * MAX_CONDITIONING_VALUE]


def one_line_error(call, name: str) -> str:
    """Run ``call``, expect a ``ValueError`` whose single line starts with ``name:``; return the message."""
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{name}: expected"), message
    assert "\n" not in message
    return message


def poisoned(shape: tuple[int, ...], value: float, seed: int = 0) -> torch.Tensor:
    """Small random values with one entry replaced by ``value``."""
    tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    tensor.view(-1)[1] = value
    return tensor


# the shared helpers --------------------------------------------------------------------------

@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_check_number_refuses(value):
    one_line_error(lambda: check_number(value, "guidance_scale", 0.0, 100.0), "guidance_scale")


@pytest.mark.parametrize("value", [0, 0.0, 1, 2.5, 100.0])
def test_check_number_accepts_the_closed_range(value):
    assert check_number(value, "x", 0.0, 100.0) == float(value)


@pytest.mark.parametrize("value", BAD_STEPS)
def test_check_steps_refuses(value):
    one_line_error(lambda: check_steps(value), "num_inference_steps")


# EmbeddingToImagePipeline (and generate_large_image on it) ---------------------------------------

def embeddings(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("name", "kwargs"), [
    *[("guidance_scale", {"guidance_scale": v}) for v in BAD_GUIDANCE],
    *[("num_inference_steps", {"num_inference_steps": v}) for v in BAD_STEPS],
    *[("height", {"height": v}) for v in (NAN, 15, -16, 16.0)],
    *[("width", {"width": v}) for v in (INF, 17, -2, 8.0)],
])
def test_embedding_pipeline_refuses_bad_numbers(pipe, name, kwargs):  # noqa: F811
    one_line_error(lambda: pipe(embeddings(), **{"num_inference_steps": 1, **kwargs}), name)


@pytest.mark.parametrize("value", BAD_CONDITIONING)
def test_embedding_pipeline_refuses_bad_embeddings(pipe, value):  # noqa: F811
    message = one_line_error(lambda: pipe(poisoned((2, 12), value), num_inference_steps=1), "embeddings")
    assert ("NaN or inf" in message) == (value != value or abs(value) == INF)


def test_embedding_pipeline_accepts_the_bounds(pipe):  # noqa: F811
    e = embeddings(1)
    e[0, 0] = MAX_CONDITIONING_VALUE
    for guidance in (0.0, 1.0, 100.0):
        out = pipe(e, num_inference_steps=1, guidance_scale=guidance, output_type="latent").images
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize(("name", "kwargs"), [
    *[("embedding_grid", {"embedding_grid": poisoned((2, 2, 12), v)}) for v in BAD_CONDITIONING],
    ("embedding_grid", {"embedding_grid": torch.zeros(0, 2, 12)}),
    ("embedding_grid", {"embedding_grid": torch.zeros(2, 12)}),
    *[("guidance_scale", {"guidance_scale": v}) for v in (NAN, INF, -1.0, 1e30)],
    *[("num_inference_steps", {"num_inference_steps": v}) for v in (0, NAN, 2.5)],
    *[("overlap", {"mode": "overlap", "overlap": v}) for v in (-1, NAN, 8, 100, 2.5, True)],
    *[("decode_tile", {"decode_tile": v}) for v in (-16, 0, NAN, 3, 16.0)],
])
def test_large_image_refuses_bad_inputs(pipe, name, kwargs):  # noqa: F811
    kwargs = {"embedding_grid": embeddings(4).reshape(2, 2, 12), "num_inference_steps": 1, **kwargs}
    one_line_error(lambda: generate_large_image(pipe, **kwargs), name)


# MaskToImagePipeline --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kwargs"), [
    *[("guidance_scale", {"guidance_scale": v}) for v in BAD_GUIDANCE],
    *[("controlnet_conditioning_scale", {"controlnet_conditioning_scale": v}) for v in BAD_CONTROLNET_SCALE],
    *[("num_inference_steps", {"num_inference_steps": v}) for v in BAD_STEPS],
    *[("embeddings", {"embeddings": poisoned((2, 12), v)}) for v in BAD_CONDITIONING],
])
def test_mask_pipeline_refuses_bad_numbers(mask_pipe, name, kwargs):  # noqa: F811
    inst, types = masks()
    kwargs = {"embeddings": embeddings(2), "num_inference_steps": 1, **kwargs}
    one_line_error(lambda: mask_pipe(inst, types, **kwargs), name)


def test_mask_pipeline_refuses_nan_scale_without_embeddings(mask_pipe):  # noqa: F811
    inst, types = masks()
    one_line_error(lambda: mask_pipe(inst, types, controlnet_conditioning_scale=NAN, num_inference_steps=1),
                   "controlnet_conditioning_scale")


# StainTransferPipeline ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stain_pipe():
    pipeline = tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, pipeline.encode_style(he_tiles(1))


@pytest.mark.parametrize("value", BAD_CONDITIONING)
def test_stain_transfer_refuses_bad_style_tokens(stain_pipe, value):
    pipeline, tokens = stain_pipe
    bad = tokens.clone()
    bad.view(-1)[1] = value
    one_line_error(lambda: pipeline(he_tiles(1), style_tokens=bad), "style_tokens")


@pytest.mark.parametrize("value", BAD_STEPS)
def test_stain_transfer_refuses_bad_steps(stain_pipe, value):
    pipeline, tokens = stain_pipe
    one_line_error(lambda: pipeline(he_tiles(1), style_tokens=tokens, num_inference_steps=value),
                   "num_inference_steps")


@pytest.mark.parametrize("value", [NAN, INF, -INF, 1.5, -0.1, 1e30])
def test_stain_transfer_refuses_bad_images_and_references(stain_pipe, value):
    pipeline, tokens = stain_pipe
    bad = he_tiles(1)
    bad[0, 0, 0, 0] = value
    one_line_error(lambda: pipeline(bad, style_tokens=tokens), "images")
    one_line_error(lambda: pipeline(he_tiles(1), reference=bad), "references[0]")


# the translation pipelines --------------------------------------------------------------------

@pytest.fixture(scope="module")
def translators():
    latent = tiny_latent_pipeline()
    latent.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    gan = GeneratorTranslationPipeline(translator=ResnetTranslator(base_channels=8, num_residual_blocks=1))
    return {"latent": latent, "gan": gan}


@pytest.mark.parametrize("kind", ["latent", "gan"])
@pytest.mark.parametrize("value", BAD_STEPS)
def test_translation_refuses_bad_steps(translators, kind, value):
    one_line_error(lambda: translators[kind](he_tiles(1), num_inference_steps=value), "num_inference_steps")


@pytest.mark.parametrize("kind", ["latent", "gan"])
@pytest.mark.parametrize("value", [NAN, INF, 2.0, -1.0])
def test_translation_refuses_bad_images(translators, kind, value):
    bad = he_tiles(1)
    bad[0, 1, 2, 3] = value
    one_line_error(lambda: translators[kind](bad), "images")


# normalizer states ------------------------------------------------------------------------------

STATES = [(MacenkoNormalizer, "target_stains"), (ReinhardNormalizer, "target_mean"),
          (ReinhardNormalizer, "target_std"), (VahadaneNormalizer, "target_max_concentrations")]


def rewrite_state(path, tensor_name=None, value=None, settings=None):
    """Rewrite a saved normalizer file with one tensor entry set to ``value`` and/or some settings replaced."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if tensor_name is not None:
        state[tensor_name] = state[tensor_name].clone()
        state[tensor_name].view(-1)[0] = value
    if settings is not None:
        meta = {**meta, "config": json.dumps({**json.loads(meta["config"]), **settings})}  # NaN -> NaN
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize(("cls", "tensor_name"), STATES)
@pytest.mark.parametrize(("value", "what"), [(NAN, "NaN"), (INF, "infinity"), (-INF, "infinity")])
def test_normalizer_state_with_nan_or_inf_is_refused(tmp_path, target_image, cls, tensor_name, value, what):
    path = cls().fit(target_image).save(tmp_path / "norm.safetensors")
    StainNormalizer.load(path)  # the untouched file loads
    rewrite_state(path, tensor_name, value)
    message = one_line_error(lambda: StainNormalizer.load(path), "path")
    assert message == f"path: expected finite values in every tensor of {path}, got {what} in {tensor_name}"
    one_line_error(lambda: cls.load(path), "path")


@pytest.mark.parametrize(("key", "value"), [("beta", NAN), ("od_max", INF), ("io", -INF)])
def test_normalizer_settings_with_nan_or_inf_are_refused(tmp_path, target_image, key, value):
    path = ReinhardNormalizer().fit(target_image).save(tmp_path / "norm.safetensors")
    rewrite_state(path, settings={key: value})
    message = one_line_error(lambda: StainNormalizer.load(path), "path")
    assert message == f"path: expected finite settings in {path}, got {key}={value}"


def test_fit_refuses_a_non_finite_state(target_image):
    class Broken(ReinhardNormalizer):
        method = ""  # not registered

        def _fit_target(self, sample):
            super()._fit_target(sample)
            self.target_std[1] = NAN

    norm = Broken()
    message = one_line_error(lambda: norm.fit(target_image), "target_images")
    assert message.endswith("got NaN in the fitted target_std")
    assert not bool(norm.fitted)
