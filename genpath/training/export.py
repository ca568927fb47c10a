"""Export a trained ``save_pretrained`` folder as a small fp16 checkpoint for ``samples/checkpoints``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def export_fp16(model_cls, source: str | Path, destination: str | Path) -> Path:  # noqa: ANN001 - a ModelMixin class
    """Load ``source`` with ``model_cls``, cast to fp16 and ``save_pretrained`` (safetensors) at ``destination``."""
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_cls.from_pretrained(str(source)).to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(destination, ignore_errors=True)
    tmp.rename(destination)
    return destination
