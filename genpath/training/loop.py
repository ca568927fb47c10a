"""A small resumable training loop on accelerate, shared by the encoder and VAE trainers.

Layout of ``output_dir``:

* ``checkpoints/step-000100/``: ``accelerator.save_state`` (model, optimizer, RNG) + ``model/``
  (``save_pretrained``); the newest is resumed from automatically;
* ``model/``: the final ``save_pretrained`` folder;
* ``log.jsonl``: one line per logged step (losses, seconds); ``samples/``: PNG grids.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from genpath.utils.atomic import atomic_directory


@dataclass
class LoopSettings:
    """What every trainer shares (the ``train`` block of a run config)."""

    output_dir: str = "out/train"
    max_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 200
    num_workers: int = 0
    mixed_precision: str = "no"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "sample_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"train.output_dir: expected a folder, got the existing file {self.output_dir}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: expected a finite positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if self.keep_checkpoints < 1 or self.num_workers < 0:
            raise ValueError(f"keep_checkpoints / num_workers: expected >= 1 / >= 0, got {self.keep_checkpoints} / "
                             f"{self.num_workers}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision: expected no, fp16 or bf16, got {self.mixed_precision!r}")


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Return the newest ``checkpoints/step-*`` folder, or None."""
    folders = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def train_loop(
    settings: LoopSettings,
    model: torch.nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, int], dict[str, torch.Tensor]],
    sample_fn: Callable[[torch.nn.Module, Path], None] | None = None,
    extra_modules: list[torch.nn.Module] | None = None,
) -> Path:
    """Train ``model`` (+ ``extra_modules``, e.g. a projection head) until ``max_steps``; resumable.

    ``loss_fn(model, batch, step)`` returns a dict with a ``"loss"`` entry (others are logged).
    Returns the final ``save_pretrained`` folder.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(settings.seed)
    modules = [model, *(extra_modules or [])]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                        drop_last=len(dataset) > settings.batch_size, num_workers=settings.num_workers,
                        generator=generator)
    prepared = accelerator.prepare(*modules, optimizer, loader)
    modules, optimizer, loader = list(prepared[: len(modules)]), prepared[-2], prepared[-1]
    step = 0
    resume = latest_checkpoint(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        step = int(resume.name.split("-")[1])
        accelerator.print(f"resumed from {resume} at step {step}")
    batches = _forever(loader)
    log = open(out / "log.jsonl", "a")
    start = time.perf_counter()
    try:
        while step < settings.max_steps:
            batch = next(batches)
            for m in modules:
                m.train()
            losses = loss_fn(modules[0], batch, step)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(losses["loss"])
            optimizer.step()
            step += 1
            if step % settings.log_every == 0 or step == settings.max_steps:
                record = {"step": step, "seconds": round(time.perf_counter() - start, 2),
                          **{k: float(v.detach()) for k, v in losses.items()}}
                log.write(json.dumps(record) + "\n")
                log.flush()
            if step % settings.checkpoint_every == 0 or step == settings.max_steps:
                _save_checkpoint(accelerator, modules[0], out, step, settings.keep_checkpoints)
            if sample_fn and (step % settings.sample_every == 0 or step == settings.max_steps):
                modules[0].eval()
                with torch.no_grad():
                    sample_fn(accelerator.unwrap_model(modules[0]), out / "samples" / f"step-{step:06d}.png")
    finally:
        log.close()
    final = out / "model"
    accelerator.unwrap_model(modules[0]).save_pretrained(str(final))
    return final


def _save_checkpoint(accelerator, model: torch.nn.Module, out: Path, step: int, keep: int) -> None:  # noqa: ANN001
    folder = out / "checkpoints" / f"step-{step:06d}"
    with atomic_directory(folder) as tmp:  # a checkpoint folder exists only once complete
        accelerator.save_state(str(tmp))
        accelerator.unwrap_model(model).save_pretrained(str(tmp / "model"))
    for old in sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
