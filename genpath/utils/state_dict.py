"""Checks on what a weights file held: a state dict (name -> tensor), never anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def as_state_dict(data: Any, path: str | Path, argument: str) -> dict[str, torch.Tensor]:  # noqa: ANN401
    """Return ``data`` as a state dict, a ``{"state_dict": {...}}`` wrapper unwrapped.

    Raises:
        ValueError: ``data`` is not a non-empty dict of tensors under string names (one line
            naming ``argument`` and ``path``).
    """
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # a training-script wrapper
        data = data["state_dict"]
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{argument}: expected a state dict (name -> tensor) in {path}, got {type(data).__name__}"
                         f"{' (empty)' if isinstance(data, dict) else ''}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{argument}: expected a state dict of tensors in {path}, got non-tensor entries "
                         f"{[str(k) for k in bad[:5]]}")
    return dict(data)
