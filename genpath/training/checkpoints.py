"""Training checkpoints that load without pickle and resume with any number of processes.

A checkpoint folder ``checkpoints/step-000100/`` holds:

* ``trained.safetensors``: every trained parameter and buffer of the task (model and extras);
* ``optimizer.pt``, ``scheduler.pt``, ``ema.pt``, ``scaler.pt``: plain tensor/number state dicts,
  read back with ``torch.load(weights_only=True)``;
* ``state.json``: the step and the number of samples seen (where the data stream resumes);
* ``model/``: the model's ``save_pretrained`` folder (usable on its own).

No random-number state is stored: every draw of a step is derived from the seed, the step and
the sample ids (:mod:`genpath.training.draws`), so nothing depends on the process layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from genpath.utils.atomic import atomic_directory
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

STATE_FILES = ("optimizer", "scheduler", "ema", "scaler")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """List the complete ``checkpoints/step-*`` folders, oldest first (temporary folders excluded)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "state.json").is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint folder of a run, or None.

    Raises:
        ValueError: the run holds checkpoints of the earlier format (accelerate ``save_state``
            folders without ``state.json``), which this loop cannot resume (one line).
    """
    root = Path(output_dir) / "checkpoints"
    old = sorted(p.name for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                 and not (p / "state.json").is_file() and (p / "model").is_dir())
    if old:
        raise ValueError(f"train.output_dir: expected genpath checkpoints (with state.json) in {root}, got "
                         f"{len(old)} of the earlier accelerate format ({old[-1]}): use another output_dir, or "
                         f"keep {old[-1]}/model (a save_pretrained folder) and move the checkpoints away")
    folders = checkpoint_folders(output_dir)
    return folders[-1] if folders else None


def save_checkpoint(folder: Path, task: torch.nn.Module, states: dict[str, Any], info: dict[str, Any],
                    keep: int) -> Path:
    """Write one checkpoint atomically (main process only) and prune all but the newest ``keep``.

    Args:
        folder: ``output_dir/checkpoints/step-NNNNNN``.
        task: the unwrapped :class:`~genpath.training.task.TrainingTask`.
        states: objects with ``state_dict()`` by name (``optimizer``, ``scheduler``, ``ema``, ``scaler``;
            None entries are skipped).
        info: JSON-able run position (``step``, ``samples_seen``, ...).
        keep: checkpoints to keep.
    """
    from safetensors.torch import save_model

    with atomic_directory(folder) as tmp:  # a checkpoint folder exists only once complete
        save_model(task, str(tmp / "trained.safetensors"))
        for name, obj in states.items():
            if obj is not None:
                torch.save(obj.state_dict(), tmp / f"{name}.pt")
        model = task.model
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(tmp / "model"))
        (tmp / "state.json").write_text(json.dumps(info, indent=1))
    for old in checkpoint_folders(folder.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path, task: torch.nn.Module, states: dict[str, Any]) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``task`` and ``states``; returns its info.

    Raises:
        ValueError: the checkpoint does not match the task (other architecture) or misses a state
            this run needs (one line, naming the folder).
    """
    from safetensors.torch import load_model

    try:
        load_model(task, str(folder / "trained.safetensors"), device=str(next(task.parameters()).device))
    except (RuntimeError, OSError) as error:
        first = str(error).splitlines()[0][:200]
        raise ValueError(f"checkpoint: expected weights matching this run's model in {folder}, got {first}") from None
    for name, obj in states.items():
        if obj is None:
            continue
        path = folder / f"{name}.pt"
        if not path.is_file():
            raise ValueError(f"checkpoint: expected {path.name} in {folder} for this run's settings, got none "
                             f"(was '{name}' off when it was written?)")
        obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return json.loads((folder / "state.json").read_text())
