"""The Examples in the docstrings run (doctest), from the project root so sample paths resolve."""

import doctest
import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genpath/utils", "genpath/wsi", "genpath/apps", "genpath/io", "genpath/encoders", "genpath/report",
            "normalization", "augment")
FILES = ("genpath/config.py", "genpath/training/options.py", "genpath/training/draws.py",
         "genpath/training/sampler.py", "genpath/training/task.py", "genpath/tiling.py", "genpath/tissue.py",
         "genpath/image_tensor.py", "genpath/data.py")


def _modules() -> list[str]:
    paths = [p for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))] + [ROOT / f for f in FILES]
    return [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in paths]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert os.getcwd() == str(ROOT)
