"""SimCLR training of genpath's small SSL encoder, with the project's stain transforms as views.

Each batch gives two views per tile: random crop-and-resize, flips, 90° rotations, HED jitter
and stain-matrix jitter (``augment``), brightness/contrast. The encoder plus a 2-layer projection
head is trained with the NT-Xent loss; only the encoder is saved.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genpath.encoders.small_cnn import SmallHistologyEncoder
from genpath.training.configs import TrainConfig
from genpath.training.draws import StepDraws
from genpath.training.loop import train_loop
from genpath.training.task import TrainingTask


def make_views(batch: torch.Tensor, size: int, strength: float = 1.0) -> torch.Tensor:
    """Two stain/geometry-augmented views ``(2B,3,S,S)`` float of a uint8 batch."""
    from genpath.utils.quiet_imports import import_kornia

    import_kornia()  # kornia's import-time torch.jit.script notices stay quiet
    import kornia.augmentation as K

    from augment import RandomHEDJitter, RandomStainJitter

    geometry = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.5, 1.0)), K.RandomHorizontalFlip(), K.RandomVerticalFlip(),
        K.RandomRotation90(times=(0, 3)),
    )
    colour = nn.Sequential(
        RandomHEDJitter(scale=0.05 * strength, shift=0.05 * strength, p=0.8),
        RandomStainJitter(p=0.5),
        K.ColorJiggle(brightness=0.15 * strength, contrast=0.15 * strength, p=0.5),
    )
    x = batch.float() / 255.0
    views = [colour(geometry(x)).clamp(0, 1) for _ in range(2)]
    return torch.cat(views)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``(2B,D)`` projections where rows ``i`` and ``i+B`` are positives."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def train_encoder(config: TrainConfig) -> Path:
    """Train the small SSL encoder; returns its ``save_pretrained`` folder."""
    torch.manual_seed(config.train.seed)
    size = config.data.size
    model = SmallHistologyEncoder(**{"input_size": size, **config.model})
    dim = model.config.embed_dim
    head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 128))
    temperature = float(config.options.get("temperature", 0.2))
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)

    def loss_fn(task: TrainingTask, batch: torch.Tensor, draws: StepDraws) -> dict[str, torch.Tensor]:
        with task.full_precision(batch.device):
            views = make_views(batch.cpu(), size).to(batch.device)
        z = task.extras["head"](task.model((views - mean.to(views)) / std.to(views)))
        return {"loss": nt_xent(gather_views(z), temperature)}

    task = TrainingTask(model, loss_fn, extras={"head": head})
    return train_loop(config.train, task, config.data.dataset(config.train.seed), run_config=config)


def gather_views(z: torch.Tensor) -> torch.Tensor:
    """All processes' projections ``(2B,D)`` → ``(2·W·B,D)`` with gradients, views kept in two halves.

    NT-Xent then sees every process's tiles as negatives, as one process with the whole batch
    would; the backward pass sums the gradients of every process's loss for each process's rows.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    first, second = z.chunk(2)
    return torch.cat([_GatherWithGradient.apply(first), _GatherWithGradient.apply(second)])


class _GatherWithGradient(torch.autograd.Function):
    """``all_gather`` whose backward all-reduces the gradient and returns this process's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001, D102
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001, D102
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
