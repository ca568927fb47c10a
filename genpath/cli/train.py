"""``genpath train KIND --config FILE``: one command, the kind chosen from the trainer registry."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import console, user_errors
from genpath.training.options import TRAINERS

TrainerKind = enum.StrEnum("TrainerKind", {kind: kind for kind in TRAINERS})
_KINDS = "\n".join(f"  {kind}: {spec.summary} (e.g. {spec.example})" for kind, spec in TRAINERS.items())


@user_errors
def train(
    kind: Annotated[TrainerKind, typer.Argument(help="What to train.")],
    config: Annotated[Path, typer.Option(help="YAML with a section named like KIND (configs/*.yaml).")],
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Override train.output_dir.")] = None,
) -> None:
    """Train a genpath model with accelerate; resumes from the last checkpoint in train.output_dir."""
    from genpath.training.run import run_training

    kind = TrainerKind(kind).value
    final = run_training(kind, config, max_steps, output_dir)
    console.print(f"{kind}: saved {final} (log: {Path(final).parent / 'log.jsonl'})", highlight=False)


train.__doc__ = f"{train.__doc__}\n\nKinds:\n\n{_KINDS}"
