"""One-step distillation of the diffusion stain normalizer (``genpath train stainfuser-distill``).

An x0-regression student: the student UNet starts as a copy of the trained teacher's and learns
to produce, in the *single* step of the one-step sampler (trailing DDIM at ``t = T - 1``, where
the x0 prediction is the output), what the frozen teacher produces with ``teacher_steps`` DDIM
steps from the same source, style tokens and initial noise. Each training step draws fresh
restaining-simulator triplets from real tiles (as the teacher's own training does:
:func:`~genpath.training.stainfuser.train_stainfuser`), encodes source and reference with the
teacher's frozen VAE and style tokenizer, draws the initial noise per sample
(:class:`~genpath.training.draws.StepDraws`), runs the teacher's sampler without gradients and
regresses the student's one-step latents onto the teacher's (MSE). ``target_weight`` adds the
simulator's ground-truth latents as a second target (0: pure distillation).

The teacher's sampling costs ``teacher_steps`` UNet passes per sample, far more than the
student's step; with ``cache_samples: N`` the targets of N triplets are computed once, before
training, into ``output_dir/targets`` (chunk by chunk, resumable) and the student trains on
them for several epochs (how the shipped ``stainfuser_1step`` was made on 2 CPU cores).

The exported folder is a ``StainTransferPipeline`` with the teacher's VAE, style tokenizer and
scheduler and the student UNet, so it loads wherever the teacher does.

Example:
    >>> from genpath.training.run import run_training
    >>> run_training("stainfuser-distill", "configs/stainfuser_1step.yaml")  # doctest: +SKIP
    PosixPath('out/train/stainfuser_1step/pipeline')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from genpath.pipelines.stainfuser_normalizer import DEFAULT_STEPS_KEY  # what the normalizer reads as its default
from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.stainfuser import random_dihedral
from genpath.training.task import TrainingTask
from genpath.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["DEFAULT_STEPS_KEY", "export_student", "train_stainfuser_distill"]


@torch.no_grad()
def ddim_latents(unet: torch.nn.Module, scheduler: Any, noise: torch.Tensor, source: torch.Tensor,
                 tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """Run the stain-transfer sampler (x0 prediction, deterministic DDIM) and return its final latents.

    The same loop as :class:`~genpath.pipelines.stain_transfer.StainTransferPipeline` without the
    VAE: ``scheduler`` is a DDIM scheduler configured like the pipeline's (a copy is made).

    Shape:
        noise, source ``(B,C,h,w)``; tokens ``(B,N,D)``; returns ``(B,C,h,w)``.
    """
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(steps, device=noise.device)
    latents = noise * sampler.init_noise_sigma
    for t in sampler.timesteps:
        model_in = torch.cat([sampler.scale_model_input(latents, t), source], 1)
        pred = unet(model_in, t, encoder_hidden_states=tokens).sample
        latents = sampler.step(pred, t, latents, eta=0.0).prev_sample
    return latents


def one_step_timestep(scheduler: Any) -> int:
    """Return the timestep the scheduler's one-step sampling evaluates the UNet at (999 for trailing DDIM)."""
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(scheduler.config)
    sampler.set_timesteps(1)
    return int(sampler.timesteps[0])


def mark_default_steps(folder: str | Path, steps: int) -> None:
    """Record in ``folder/model_index.json`` the step count the folder's model is meant to sample with.

    Diffusers ignores keys starting with ``_`` when it loads a pipeline; the stain normalizer can
    read this one as its default ``num_inference_steps``.
    """
    index = Path(folder) / "model_index.json"
    spec = json.loads(index.read_text())
    spec[DEFAULT_STEPS_KEY] = int(steps)
    index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def export_student(source: str | Path, destination: str | Path) -> Path:
    """Write the trained pipeline folder as fp16 safetensors (``samples/checkpoints``), marked as one-step.

    Example:
        >>> export_student("out/train/stainfuser_1step/pipeline",
        ...                "samples/checkpoints/stainfuser_1step")  # doctest: +SKIP
    """
    from genpath.pipelines.stain_transfer import StainTransferPipeline
    from genpath.training.export import export_fp16

    out = export_fp16(StainTransferPipeline, source, destination)
    mark_default_steps(out, 1)
    return out


class TeacherTargets(Dataset):
    """Precomputed teacher targets (``cache_samples``): ``source``, ``cells``, ``weights``, ``noise``, ``goal``.

    Written chunk by chunk (:func:`write_teacher_targets`), read back as one dataset of dicts.
    """

    KEYS = ("source", "cells", "weights", "noise", "goal")

    def __init__(self, folder: str | Path) -> None:
        files = sorted(Path(folder).glob("chunk-*.safetensors"))
        if not files:
            raise FileNotFoundError(f"options.cache_samples: expected target chunks in {folder}, got none")
        from safetensors.torch import load_file

        chunks = [load_file(str(f)) for f in files]
        self.items = {k: torch.cat([c[k] for c in chunks]) for k in self.KEYS}

    def __len__(self) -> int:
        return len(self.items["goal"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.items.items()}


def train_stainfuser_distill(config: TrainConfig) -> Path:
    """Distil a StainTransferPipeline into one step; returns the student pipeline folder (``output_dir/pipeline``).

    Options: ``teacher`` (a StainTransferPipeline folder, required), ``teacher_steps`` (DDIM steps of
    the teacher's targets), ``simulator`` (kwargs of :class:`~normalization.restain.RestainingSimulator`),
    ``target_weight`` (weight of the simulator's ground truth; 0 = pure distillation; online only),
    ``cache_samples`` (0: fresh triplets and teacher targets every step; N: precompute N targets once
    into ``output_dir/targets`` (resumable, chunk by chunk) and train on them: the teacher's
    sampling is then paid once instead of every epoch).
    The student UNet is initialised from the teacher's; the VAE and style tokenizer stay frozen.
    """
    from diffusers import UNet2DConditionModel

    from genpath.models.style import latent_cells
    from genpath.models.vae import downsampling_factor, encode_tiled
    from genpath.pipelines.stain_transfer import StainTransferPipeline, tissue_weights
    from genpath.training.vae import save_grid
    from normalization.restain import RestainingSimulator

    options = config.options
    if "teacher" not in options:
        raise ValueError("options.teacher: expected a StainTransferPipeline folder "
                         "(e.g. samples/checkpoints/stainfuser_small), got none")
    torch.manual_seed(config.train.seed)
    teacher = StainTransferPipeline.from_pretrained(options["teacher"], dtype=torch.float32)
    vae, tokenizer, scheduler = teacher.vae.eval(), teacher.style_tokenizer.eval(), teacher.scheduler
    f = downsampling_factor(vae)
    if config.data.size % f:
        raise ValueError(f"data.size: expected a multiple of the VAE factor {f}, got {config.data.size}")
    teacher_steps, target_weight = int(options["teacher_steps"]), float(options["target_weight"])
    cache_samples = int(options["cache_samples"])
    if cache_samples and target_weight:
        raise ValueError(f"options.target_weight: expected 0 with cache_samples (the cache holds teacher "
                         f"targets only), got {target_weight}")
    student = UNet2DConditionModel.from_config(teacher.unet.config)
    student.load_state_dict(teacher.unet.state_dict())
    t_one = one_step_timestep(scheduler)
    simulator = RestainingSimulator(**options.get("simulator", {}))
    tiles = config.data.dataset(config.train.seed)
    preview_tiles = torch.stack([tiles[i] for i in range(min(4, len(tiles)))]).float() / 255
    preview = simulator(preview_tiles, generator=torch.Generator().manual_seed(0))
    preview_rows: dict[str, torch.Tensor] = {}

    def encode(x: torch.Tensor) -> torch.Tensor:
        return encode_tiled(vae, x.to(next(vae.parameters()).dtype)).float()

    @torch.no_grad()
    def teacher_batch(batch: torch.Tensor, noise_fn: Any) -> dict[str, torch.Tensor]:
        """Restain uint8 tiles (simulator) into source latents, reference cells, noise and the teacher's latents."""
        with TrainingTask.full_precision(batch.device):  # the simulator draws from the global RNG
            triplet = simulator(random_dihedral(batch.float() / 255))
        source = encode(triplet.source)
        cells, weights = latent_cells(encode(triplet.reference), tissue_weights(triplet.reference, f))
        noise = noise_fn(tuple(source.shape[1:]), source.device)
        dtype = next(teacher.unet.parameters()).dtype
        tokens = tokenizer(cells.to(dtype), weights.to(dtype))
        goal = ddim_latents(teacher.unet, scheduler, noise.to(dtype), source.to(dtype), tokens, teacher_steps)
        out = {"source": source, "cells": cells, "weights": weights, "noise": noise, "goal": goal.float()}
        if target_weight > 0:
            out["truth"] = encode(triplet.target)
        return out

    dataset: Dataset = tiles
    if cache_samples:
        folder = Path(config.train.output_dir) / "targets"
        write_teacher_targets(folder, tiles, teacher_batch, cache_samples, config.train.batch_size,
                              config.train.seed)
        dataset = TeacherTargets(folder)

    def loss_fn(task: TrainingTask, batch: Any, draws: StepDraws) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):  # online: fresh triplets (global RNG, seeded per step), per-sample noise
            batch = teacher_batch(batch, draws.normal)
        with torch.no_grad():
            tokens = task.frozen["tokenizer"](batch["cells"].to(task.frozen_dtype),
                                              batch["weights"].to(task.frozen_dtype)).float()
        noise, source = batch["noise"].float(), batch["source"].float()
        t = torch.full((len(source),), t_one, device=source.device, dtype=torch.long)
        pred = task.model(torch.cat([noise, source], 1), t, encoder_hidden_states=tokens).sample.float()
        distill = F.mse_loss(pred, batch["goal"].float())
        losses = {"distill_mse": distill.detach()}
        if "truth" in batch:
            target = F.mse_loss(pred, batch["truth"])
            losses["target_mse"] = target.detach()
            distill = distill + target_weight * target
        return {"loss": distill, **losses}

    def pipeline_from(unet_model: torch.nn.Module) -> StainTransferPipeline:
        return StainTransferPipeline(vae=vae, unet=unet_model, style_tokenizer=tokenizer, scheduler=scheduler)

    def sample_fn(unet_model: torch.nn.Module, path: Path) -> None:
        device = unet_model.device

        def restain(pipe: StainTransferPipeline, steps: int) -> torch.Tensor:
            pipe.set_progress_bar_config(disable=True)
            out = []
            for i in range(len(preview.source)):
                tokens = pipe.encode_style(preview.reference[i : i + 1].to(device))
                out.append(pipe(preview.source[i : i + 1].to(device), style_tokens=tokens,
                                num_inference_steps=steps).images.float().cpu())
            return torch.cat(out)

        if "teacher" not in preview_rows:  # the teacher's row does not change: drawn once
            preview_rows["teacher"] = restain(pipeline_from(teacher.unet.to(device)), teacher_steps)
        rows = [preview.source, preview.reference, preview.target, preview_rows["teacher"],
                restain(pipeline_from(unet_model), 1)]
        save_grid(torch.cat(rows), path, columns=len(preview.source))

    def export(unet_model: torch.nn.Module, folder: Path) -> None:
        pipeline_from(unet_model).to("cpu").save_pretrained(str(folder))
        mark_default_steps(folder, 1)

    task = TrainingTask(student, loss_fn, frozen={"vae": vae, "tokenizer": tokenizer, "teacher": teacher.unet})
    return train_loop(config.train, task, dataset, sample_fn, export, export_folder="pipeline", run_config=config)


def write_teacher_targets(folder: Path, tiles: Dataset, teacher_batch: Any, samples: int, batch_size: int,
                          seed: int) -> None:
    """Precompute ``samples`` teacher targets in chunks of ``batch_size`` (resumable: written chunks are kept).

    Chunk ``k`` takes the tiles at positions ``k·batch_size ...`` of one seeded permutation of
    ``tiles`` and seeds the simulator and the noise from ``(seed, k)``, so a resumed or repeated run
    writes the same chunks.
    """
    from safetensors.torch import save_file

    from genpath.training.draws import sample_seed
    from genpath.utils.atomic import atomic_path

    order = torch.randperm(len(tiles), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    chunks = -(-samples // batch_size)
    for k in range(chunks):
        path = folder / f"chunk-{k:05d}.safetensors"
        if path.is_file():
            continue
        ids = [int(order[i % len(order)]) for i in range(k * batch_size, min((k + 1) * batch_size, samples))]
        batch = torch.stack([tiles[i] for i in ids])
        torch.manual_seed(sample_seed(seed, k, 0, "distill.simulator"))
        draws = StepDraws(seed, k, torch.tensor(ids))
        items = teacher_batch(batch, lambda shape, device, d=draws: d.normal(shape, device, stream="distill.noise"))
        with atomic_path(path) as tmp:
            save_file({key: items[key].contiguous().cpu() for key in TeacherTargets.KEYS}, str(tmp))
        if k % 10 == 0 or k == chunks - 1:
            logger.info("teacher targets: chunk %d/%d", k + 1, chunks)
