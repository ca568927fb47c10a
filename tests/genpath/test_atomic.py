"""Atomic writes: the destination is whole or untouched, no temporary file is left behind."""

import csv
import json

import pytest

from genpath.utils.atomic import atomic_directory, atomic_path, atomic_write_csv, atomic_write_json, atomic_write_yaml


def test_writers_round_trip_and_leave_nothing_behind(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    atomic_write_yaml(tmp_path / "a.yaml", {"y": 1})
    atomic_write_csv(tmp_path / "a.csv", [{"a": 1, "b": None, "extra": 3}], ("a", "b"))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "a.yaml").read_text() == "y: 1\n"
    assert list(csv.DictReader(open(tmp_path / "a.csv"))) == [{"a": "1", "b": ""}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json", "a.yaml"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"bad": float("nan")})  # NaN is not JSON
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    folder = tmp_path / "model"
    with atomic_directory(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"2")
        raise RuntimeError("interrupted")
    assert (folder / "weights.bin").read_bytes() == b"1"
    with atomic_directory(folder) as tmp:
        (tmp / "weights.bin").write_bytes(b"3")
    assert (folder / "weights.bin").read_bytes() == b"3"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
