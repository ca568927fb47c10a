"""Run one trainer by kind: what ``genpath train KIND`` calls, callable from Python the same way.

Example:
    >>> from genpath.training.run import run_training
    >>> run_training("vae", "configs/tiny.yaml", max_steps=1, output_dir="out/doc_vae")  # doctest: +SKIP
    PosixPath('out/doc_vae/model')
"""

from __future__ import annotations

import importlib
from pathlib import Path

from genpath.training.configs import load_train_config
from genpath.training.options import TRAINERS
from genpath.utils.logging import get_logger

logger = get_logger(__name__)


def run_training(kind: str, config: str | Path, max_steps: int | None = None,
                 output_dir: str | Path | None = None) -> Path:
    """Load ``config``'s ``kind`` section, apply the overrides and train; returns what the trainer saved.

    Args:
        kind: a registered trainer (:data:`genpath.training.options.TRAINERS`).
        config: YAML file with a section named ``kind``.
        max_steps: override ``train.max_steps``.
        output_dir: override ``train.output_dir`` (resumes from its last checkpoint).

    Raises:
        ValueError: unknown kind, or a bad config (one line, naming the key).
        FileNotFoundError: the config file is missing.
    """
    if kind not in TRAINERS:
        raise ValueError(f"kind: expected one of {sorted(TRAINERS)}, got {kind!r}")
    cfg = load_train_config(str(config), kind)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if output_dir is not None:
        cfg.train.output_dir = str(output_dir)
    cfg.train.__post_init__()
    module, name = TRAINERS[kind].function.split(":")
    logger.info("training %s into %s", kind, cfg.train.output_dir)
    return getattr(importlib.import_module(module), name)(cfg)
