"""Property tests: random bad tiles and bad arguments give documented errors, never NaN."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from augment import RandomHEDJitter, RandomStainJitter, RandomStainNA, StainNAStatistics
from normalization import MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer
from tests.conftest import STAINS_A, concentrations, render

TARGET = render(concentrations(1, 64, seed=11), STAINS_A)[0]
NORMALIZERS = [cls().fit(TARGET) for cls in (MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer)]
STATS = StainNAStatistics([62.0, 25.0, -12.0], [6.0, 4.0, 4.0], [14.0, 9.0, 7.0], [2.0, 1.5, 1.5])
TRANSFORMS = [RandomHEDJitter(p=1.0), RandomStainJitter(p=1.0), RandomStainNA(STATS, p=1.0)]
OPS = NORMALIZERS + TRANSFORMS


@st.composite
def tiles(draw):
    b = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["uniform", "constant", "binary", "sparse"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        x = torch.rand(b, 3, h, w, generator=g)
    elif kind == "constant":
        x = torch.full((b, 3, h, w), draw(st.floats(0, 1)))
    elif kind == "binary":
        x = (torch.rand(b, 3, h, w, generator=g) > 0.5).float()
    else:
        x = torch.ones(b, 3, h, w)
        x[..., 0, 0] = torch.rand(b, 3, generator=g)
    return x if draw(st.booleans()) else (x * 255).round().to(torch.uint8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tiles(), index=st.integers(0, len(OPS) - 1))
def test_random_tiles_never_crash_or_nan(x, index):
    out = OPS[index](x)
    assert out.shape == x.shape and out.dtype == x.dtype
    if out.is_floating_point():
        assert torch.isfinite(out).all()


BAD = [
    (torch.rand(2, 4, 8, 8), ValueError, "3 RGB channels"),
    (torch.rand(8, 8), ValueError, "shape"),
    (torch.rand(1, 1, 3, 8, 8), ValueError, "shape"),
    (torch.rand(2, 3, 8, 8) * 2, ValueError, r"\[0, 1\]"),
    (torch.full((1, 3, 4, 4), float("nan")), ValueError, "finite"),
    (torch.empty(0, 3, 8, 8), ValueError, "non-empty"),
    (torch.ones(1, 3, 4, 4, dtype=torch.int32), TypeError, "dtype"),
    ([[0.5]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("op", OPS, ids=lambda o: type(o).__name__)
@pytest.mark.parametrize(("bad", "error", "match"), BAD)
def test_bad_input_errors_name_argument_and_expectation(op, bad, error, match):
    with pytest.raises(error, match=match) as info:
        op(bad)
    assert "expected" in str(info.value)
