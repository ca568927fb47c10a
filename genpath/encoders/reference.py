"""``encoder.json``: which registered encoder a saved model expects its embeddings from.

Pipelines conditioned on embeddings and HistAug models store one next to their weights, so
``genpath synth`` and the benchmarks can embed images with the right encoder. Weight paths are
stored relative to the model folder, so moving both folders together keeps the link.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from genpath.encoders.base import ImageEncoder
from genpath.encoders.registry import create_encoder

_PATH_KEYS = ("path", "checkpoint_path")


def save_encoder_reference(folder: str | Path, name: str, kwargs: dict[str, Any]) -> Path:
    """Write ``folder/encoder.json`` naming the registered encoder ``name`` and its ``kwargs``."""
    folder = Path(folder)
    stored = {}
    for key, value in kwargs.items():
        if key in _PATH_KEYS and Path(value).exists():
            value = os.path.relpath(Path(value).resolve(), folder.resolve())
        stored[key] = str(value) if isinstance(value, Path) else value
    path = folder / "encoder.json"
    path.write_text(json.dumps({"name": name, "kwargs": stored}, indent=1))
    return path


def load_encoder_reference(folder: str | Path) -> ImageEncoder:
    """Create the encoder recorded in ``folder/encoder.json`` (relative paths resolve against ``folder``)."""
    folder = Path(folder)
    record = folder / "encoder.json"
    if not record.is_file():
        raise FileNotFoundError(f"model: expected {record} naming the encoder of its embeddings, got none")
    spec = json.loads(record.read_text())
    kwargs = {k: (str(folder / v) if k in _PATH_KEYS and not Path(v).is_absolute() else v)
              for k, v in spec.get("kwargs", {}).items()}
    return create_encoder(spec["name"], **kwargs)


def copy_encoder_reference(source: str | Path, destination: str | Path) -> Path:
    """Copy ``source/encoder.json`` to ``destination``, re-basing relative weight paths."""
    source = Path(source)
    record = source / "encoder.json"
    if not record.is_file():
        raise FileNotFoundError(f"model: expected {record} naming the encoder of its embeddings, got none")
    spec = json.loads(record.read_text())
    kwargs = {k: (str(source / v) if k in _PATH_KEYS and not Path(v).is_absolute() else v)
              for k, v in spec.get("kwargs", {}).items()}
    return save_encoder_reference(destination, spec["name"], kwargs)
