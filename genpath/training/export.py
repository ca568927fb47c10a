"""Export a trained ``save_pretrained`` folder as a small fp16 checkpoint for ``samples/checkpoints``."""

from __future__ import annotations

from pathlib import Path

import torch

from genpath.utils.atomic import atomic_directory


def export_fp16(model_cls, source: str | Path, destination: str | Path) -> Path:  # noqa: ANN001 - a ModelMixin class
    """Load ``source`` with ``model_cls``, cast to fp16 and ``save_pretrained`` (safetensors) at ``destination``."""
    destination = Path(destination)
    model = model_cls.from_pretrained(str(source)).to(torch.float16)
    with atomic_directory(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return destination
