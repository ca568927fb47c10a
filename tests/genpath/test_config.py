"""Typed run configs: a misspelt key, a wrong type, NaN or bad YAML is one line naming it."""

from dataclasses import dataclass, field

import pytest

from genpath.config import check_types, load_config, read_yaml
from genpath.training.options import resolve_options
from normalization.config import NormalizeConfig


@dataclass
class Run:
    steps: int = 10
    rate: float = 0.1
    name: str | None = None
    sizes: list[int] = field(default_factory=list)


@pytest.mark.parametrize(("text", "match"), [
    ("run: {stpes: 3}", r"unknown keys \['stpes'\]"),
    ("run: {steps: '3'}", "steps: expected int"),
    ("run: {steps: 3.5}", "steps: expected int"),
    ("run: {steps: true}", "steps: expected int"),
    ("run: {rate: .nan}", "rate: expected finite"),
    ("run: {rate: .inf}", "rate: expected finite"),
    ("run: {rate: fast}", "rate: expected float"),
    ("run: {sizes: [1, x]}", "sizes: expected list"),
    ("run: [1, 2]", "expected a mapping"),
    ("run: {steps: [}", "syntax error at line 1"),
    ("- a\n- b", "expected a mapping with a 'run' section"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_config(path, Run, section="run")
    assert "\n" not in str(info.value)


def test_good_config_and_yaml_exponents(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("run: {steps: 3, rate: 1e-4, sizes: [1, 2]}")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(path, Run, section="run") == Run(steps=3, rate=1e-4, sizes=[1, 2])
    assert load_config(tmp_path / "ok.yaml", Run, section="other") == Run()
    with pytest.raises(FileNotFoundError, match="config"):
        read_yaml(tmp_path / "missing.yaml")
    assert check_types(Run, {"rate": 2}) == {"rate": 2}


def test_normalize_config_rejects_nan_mpp_and_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="mpp"):
        NormalizeConfig(mpp=float("nan"))
    with pytest.raises(ValueError, match="method"):
        NormalizeConfig(method="nope")
    path = tmp_path / "n.yaml"
    path.write_text("normalize: {method: macenko, batch_sise: 4}")
    with pytest.raises(ValueError, match="batch_sise"):
        load_config(path, NormalizeConfig, section="normalize")


def test_trainer_options_are_typed():
    assert resolve_options("ldm", {"vae": "v", "encoder": "e"})["num_tokens"] == 4
    with pytest.raises(ValueError, match=r"unknown keys \['num_token'\]"):
        resolve_options("ldm", {"num_token": 4})
    with pytest.raises(ValueError, match="cond_dropout: expected float"):
        resolve_options("controlnet", {"cond_dropout": "high"})
    with pytest.raises(ValueError, match="kind"):
        resolve_options("gan", {})


def test_training_settings_name_bad_values(tmp_path):
    from genpath.training.configs import TrainConfig

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="train.output_dir: expected a folder"):
        TrainConfig.from_dict({"data": {"roots": ["x"]}, "train": {"output_dir": str(afile)}})
    with pytest.raises(ValueError, match="data.holdout"):
        TrainConfig.from_dict({"data": {"roots": ["x"], "holdout": 1.5}})
