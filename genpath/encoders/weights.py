"""Reading published weight files without running code, and strict loading that names what is wrong.

``.safetensors`` files are read with ``safetensors``; every other file (``.bin``, ``.pth``, ``.pt``)
with ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only: a file
whose pickle would call code (``__reduce__`` payloads) is refused before anything runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path | None, argument: str = "checkpoint_path", what: str = "weight file",
                    unwrap: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file (never downloads, never runs pickled code).

    Args:
        path: ``.safetensors``, or a ``torch.save`` file (``.bin``, ``.pth``, ...).
        argument: the argument's name, for error messages.
        what: what the file should be, for error messages (``MahmoodLab/UNI pytorch_model.bin``).
        unwrap: also accept a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper (training checkpoints).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a weights-only file, or not a mapping of names to tensors.
    """
    if path is None:
        raise ValueError(f"{argument}: expected a local {what}, got None (genpath never downloads weights)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: expected a local {what}, got {path} (missing)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: object = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{argument}: expected a readable safetensors {what}, got {path} ({error})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as error:
            raise ValueError(
                f"{argument}: expected a weights-only {what} (tensors and plain containers), got {path}, which "
                f"torch.load(weights_only=True) refuses ({_reason(error)}); genpath never unpickles code") from None
    if unwrap and isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__
        raise ValueError(f"{argument}: expected a mapping of parameter names to tensors in {path}, got a {kind}")
    return dict(state)


def _reason(error: Exception) -> str:
    """Return the informative line of a ``torch.load`` error (its ``Unsupported global`` line if any)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line:
            return line.split(". Please")[0].removeprefix("WeightsUnpickler error: ")[:160]
    return (lines[0] if lines else type(error).__name__)[:160]


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], argument: str, layout: str,
                path: str | Path) -> None:
    """Load ``state`` into ``module``: every key present, none extra, every shape equal, else one error.

    Raises:
        ValueError: missing or unexpected keys (a few are listed), or a tensor of another shape.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{argument}: expected the {layout} keys, got {len(missing)} missing {missing[:4]} and "
            f"{len(unexpected)} unexpected {unexpected[:4]} in {path} (another model, or architecture overrides "
            "that do not match it)")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{argument}: expected {layout} tensors shaped for this architecture, got {k} {tuple(state[k].shape)} "
            f"where it has {tuple(own[k].shape)} ({len(wrong)} mismatched) in {path}")
    module.load_state_dict(dict(state), strict=True)
