"""The resumable accelerate training loop every trainer shares: one process or many (DDP), CPU or GPU.

Launch a trainer on N processes with ``accelerate launch $(which genpath) train KIND --config C``
or ``torchrun --nproc_per_node N $(which genpath) train KIND --config C``. What the loop does:

* prepares one :class:`~genpath.training.task.TrainingTask` (trained model + extras) and the
  optimizer; frozen modules go to the device in the weight dtype of ``mixed_precision``;
* draws the data from one seeded sample stream (:mod:`genpath.training.sampler`) and every
  random number per sample (:mod:`genpath.training.draws`): N processes with batch ``b`` follow
  the loss curve of one process with batch ``N·b``;
* gradient accumulation, clipping (``max_grad_norm``), a learning-rate schedule with warm-up
  (``diffusers.optimization.get_scheduler``), EMA weights (``diffusers.training_utils.EMAModel``,
  exported when ``ema`` is on), gradient checkpointing where the model supports it;
* the main process alone logs (``log.jsonl``: step, losses averaged over processes, learning
  rate, samples/s; a progress bar with ETA on a terminal; accelerate trackers via ``log_with``),
  draws sample grids and saves, the others wait.

Layout of ``output_dir``: ``checkpoints/step-NNNNNN/`` (:mod:`genpath.training.checkpoints`; the
newest is resumed from automatically), ``model/`` (final ``save_pretrained``), ``log.jsonl``,
``samples/`` (PNG grids).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from genpath.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from genpath.training.draws import StepDraws, sample_seed
from genpath.training.sampler import IndexedDataset, RankBatchSampler
from genpath.training.task import TrainingTask
from genpath.utils.logging import get_logger

__all__ = ["LoopSettings", "latest_checkpoint", "train_loop"]

logger = get_logger(__name__)

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")


@dataclass
class LoopSettings:
    """What every trainer shares (the ``train`` block of a run config).

    ``batch_size`` is per process and micro-batch: one optimizer step sees
    ``batch_size × processes × gradient_accumulation_steps`` samples.
    """

    output_dir: str = "out/train"
    max_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 200
    num_workers: int = 0
    mixed_precision: str = "no"
    log_with: list[str] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "sample_every",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"train.output_dir: expected a folder, got the existing file {self.output_dir}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate: expected a finite positive number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm: expected a finite number > 0 (or null: no clipping), "
                             f"got {self.max_grad_norm}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay}")
        if self.keep_checkpoints < 1 or self.num_workers < 0 or self.lr_warmup_steps < 0:
            raise ValueError(f"keep_checkpoints / num_workers / lr_warmup_steps: expected >= 1 / >= 0 / >= 0, got "
                             f"{self.keep_checkpoints} / {self.num_workers} / {self.lr_warmup_steps}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision: expected no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler: expected one of {list(SCHEDULES)}, got {self.lr_scheduler!r}")
        unknown = sorted(set(self.log_with) - set(TRACKERS))
        if unknown:
            raise ValueError(f"log_with: expected trackers among {list(TRACKERS)}, got {unknown}")


def process_state():  # noqa: ANN201 - accelerate.PartialState
    """Return accelerate's process state (rank, main process), initialising the process group if launched.

    Without CUDA, ``PartialState()`` alone does not join a torchrun/gloo group; ``cpu=True`` does.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _accelerator(settings: LoopSettings, find_unused: bool):  # noqa: ANN202 - accelerate.Accelerator
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available

    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision: expected bf16 or no on a machine without CUDA, got 'fp16'")
    if "tensorboard" in settings.log_with and not is_tensorboard_available():
        raise ValueError("log_with: expected the tensorboard package for 'tensorboard' "
                         "(pip install 'genpath[tracking]'), got it missing")
    from accelerate.state import AcceleratorState, GradientState

    # a second run in the same Python process may use other settings (the process group stays)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=settings.mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_steps=settings.gradient_accumulation_steps,
                       log_with=list(settings.log_with) or None, project_dir=settings.output_dir,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a run config into ``{"train.batch_size": 8}`` scalars (what trackers record)."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config if isinstance(config, int | float | str | bool) else str(config)}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _move_frozen(task: TrainingTask, device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """Move frozen modules to ``device``/``dtype``; returns their original tensors when the dtype changes."""
    originals = {}
    with _quiet_diffusers():
        for name, module in task.frozen.items():
            if dtype != torch.float32:
                originals[name] = dict(module.state_dict())
            module.to(device=device, dtype=dtype)
    return originals


def _restore_frozen(task: TrainingTask, originals: dict[str, dict]) -> None:
    with _quiet_diffusers():
        for name, state in originals.items():
            task.frozen[name].to(dtype=torch.float32).load_state_dict(state)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' "modules that should be kept in float32: []" notice of every ``.to(dtype)``."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written by a run that stopped before its next checkpoint)."""
    if not path.is_file():
        return
    from genpath.utils.atomic import atomic_write_text

    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def train_loop(
    settings: LoopSettings,
    task: TrainingTask,
    dataset: Dataset,
    sample_fn: Callable[[torch.nn.Module, Path], None] | None = None,
    export_fn: Callable[[torch.nn.Module, Path], None] | None = None,
    export_folder: str = "model",
    run_config: Any = None,
) -> Path:
    """Train ``task`` until ``settings.max_steps`` (resuming from the newest checkpoint); returns the export.

    Args:
        settings: the ``train`` block.
        task: trained and frozen modules and the loss function.
        dataset: items the loss function takes (collated by the default collate).
        sample_fn: ``sample_fn(model, png_path)`` draws a preview grid (main process, EMA weights).
        export_fn: ``export_fn(model, folder)`` writes the final result into ``output_dir/export_folder``
            (main process, EMA weights); default: ``model.save_pretrained(folder)``.
        export_folder: the name of that folder.
        run_config: the whole run config, recorded by the trackers.

    Returns:
        The exported folder (the same path on every process; only the main process writes it).
    """
    import warnings

    from accelerate.utils import send_to_device, set_seed

    # DDP's performance hint for 1x1 convolutions whose gradients come back in another (equivalent) layout
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    out = Path(settings.output_dir)
    accelerator = _accelerator(settings, task.find_unused_parameters)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    set_seed(settings.seed)
    if settings.gradient_checkpointing:
        model = task.model  # diffusers models say _supports_gradient_checkpointing, others may say it without "_"
        if not (getattr(model, "_supports_gradient_checkpointing", False)
                or getattr(model, "supports_gradient_checkpointing", False)):
            raise ValueError(f"train.gradient_checkpointing: expected a model that supports it, got "
                             f"{type(task.model).__name__}")
        task.model.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.mixed_precision, torch.float32)
    originals = _move_frozen(task, accelerator.device, weight_dtype)
    params = task.trained_parameters()
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    from diffusers.optimization import get_scheduler

    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                              num_training_steps=settings.max_steps)
    ema = None
    if settings.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=settings.ema_decay, use_ema_warmup=settings.ema_warmup)
    prepared, optimizer = accelerator.prepare(task.to(accelerator.device), optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    states = {"optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": accelerator.scaler}

    step, samples_seen = 0, 0
    resume = latest_checkpoint(out)
    if resume is not None:
        info = load_checkpoint(resume, task, states)
        step, samples_seen = int(info["step"]), int(info["samples_seen"])
        if ema is not None:
            ema.to(accelerator.device)
        logger.info("resumed from %s at step %d (%d samples seen)", resume, step, samples_seen)
    per_step = settings.batch_size * world * settings.gradient_accumulation_steps
    sampler = RankBatchSampler(len(dataset), settings.batch_size, rank, world, settings.seed,
                               start=samples_seen)  # type: ignore[arg-type]
    batches = iter(DataLoader(IndexedDataset(dataset), batch_sampler=sampler, num_workers=settings.num_workers,
                              persistent_workers=settings.num_workers > 0, pin_memory=torch.cuda.is_available()))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(out / "log.jsonl", step)
    if settings.log_with:
        accelerator.init_trackers(out.name or "genpath", config=_flat(run_config if run_config is not None
                                                                        else settings))
    bar = _progress_bar(main, settings.max_steps, step)
    window_start, window_samples = time.perf_counter(), 0
    started = time.perf_counter()
    try:
        while step < settings.max_steps:
            totals: dict[str, torch.Tensor] = {}
            prepared.train()
            for micro in range(settings.gradient_accumulation_steps):
                ids, batch = next(batches)
                batch = send_to_device(batch, accelerator.device)
                draws = StepDraws(settings.seed, step, ids)
                # a trainer that still uses the global RNG (kornia views) gets a per-process, per-step seed
                torch.manual_seed(sample_seed(settings.seed, step, rank * 1_000 + micro, "global"))
                with accelerator.accumulate(prepared):
                    losses = prepared(batch, draws)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and settings.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in losses.items():
                    totals[key] = totals.get(key, 0) + value.detach().float() / settings.gradient_accumulation_steps
            used_lr = optimizer.param_groups[0]["lr"]  # the rate this step was taken with
            scheduler.step()
            if ema is not None:
                ema.step(params)
            step += 1
            samples_seen += per_step
            window_samples += per_step
            if step % settings.log_every == 0 or step == settings.max_steps:
                keys = sorted(totals)
                means = accelerator.reduce(torch.stack([totals[k] for k in keys]), reduction="mean")
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "seconds": round(time.perf_counter() - started, 2),
                          **{k: float(v) for k, v in zip(keys, means, strict=True)},
                          "lr": used_lr, "samples_per_s": round(window_samples / elapsed, 2)}
                window_start, window_samples = time.perf_counter(), 0
                if main:
                    with open(out / "log.jsonl", "a") as log:
                        log.write(json.dumps(record) + "\n")
                    _report(bar, record, settings.max_steps, started, step)
                if settings.log_with:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            elif bar is not None:
                bar.update(step - bar.n)
            if sample_fn and (step % settings.sample_every == 0 or step == settings.max_steps):
                if main:
                    _with_ema(ema, params, lambda at=step: _sample(sample_fn, accelerator, task, out, at))
                accelerator.wait_for_everyone()
            if step % settings.checkpoint_every == 0 or step == settings.max_steps:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(out / "checkpoints" / f"step-{step:06d}", task, states,
                                    {"step": step, "samples_seen": samples_seen, "processes": world,
                                     "batch_size": settings.batch_size}, settings.keep_checkpoints)
                accelerator.wait_for_everyone()
    finally:
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)  # the exported weights are the EMA weights
    _restore_frozen(task, originals)
    final = out / export_folder
    if main:
        (export_fn or _save_model)(accelerator.unwrap_model(prepared).model, final)
    accelerator.wait_for_everyone()
    if settings.log_with:
        accelerator.end_training()
    return final


def _save_model(model: torch.nn.Module, folder: Path) -> None:
    model.save_pretrained(str(folder))


def _with_ema(ema: Any, params: list[torch.nn.Parameter], run: Callable[[], None]) -> None:
    if ema is None:
        run()
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        run()
    finally:
        ema.restore(params)


def _sample(sample_fn: Callable, accelerator: Any, task: TrainingTask, out: Path, step: int) -> None:
    model = task.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        sample_fn(model, out / "samples" / f"step-{step:06d}.png")
    model.train(was_training)


def _progress_bar(main: bool, total: int, initial: int):  # noqa: ANN202 - tqdm or None
    if not main or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _report(bar: Any, record: dict[str, Any], total: int, started: float, step: int) -> None:
    """Progress on a terminal (bar) or in the log (INFO line with loss, samples/s and ETA)."""
    if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{record['loss']:.4g}", samples_s=record["samples_per_s"])
        return
    rate = (time.perf_counter() - started) / max(step, 1)
    logger.info("step %d/%d loss %.4g %.1f samples/s ETA %.0f s", step, total, record["loss"],
                record["samples_per_s"], rate * (total - step))
