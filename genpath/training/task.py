"""What a training run optimizes: the trained modules, the frozen ones, and the step's loss function.

A :class:`TrainingTask` is the one module handed to ``accelerator.prepare``: its ``forward``
runs the trainer's loss function on a batch. Calling the prepared (possibly
``DistributedDataParallel``) task is what makes every trained parameter, those of extra heads
and projectors included, take part in gradient synchronisation, while the loss function can use
any method of the inner modules (``vae.encode``, ``encoder.nce_features``). Frozen modules are
held outside the parameter registry: they are not checkpointed or synchronised, and the loop
moves them to the accelerator's device and weight dtype.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> task = TrainingTask(net, lambda t, batch, draws: {"loss": t.model(batch).pow(2).mean()})
    >>> sorted(name for name, _ in task.named_parameters())
    ['model.bias', 'model.weight']
    >>> task(torch.ones(3, 2), None)["loss"].shape
    torch.Size([])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: ``loss_fn(task, batch, draws)`` returns a dict with a ``"loss"`` entry (others are logged).
LossFunction = Callable[["TrainingTask", Any, Any], dict[str, torch.Tensor]]


class TrainingTask(nn.Module):
    """The trained ``model`` (exported), ``extras`` trained alongside it, ``frozen`` helpers.

    Args:
        model: the module whose weights the run exports (``save_pretrained``).
        loss_fn: ``loss_fn(task, batch, draws)`` (see :data:`LossFunction`); called inside ``forward``.
        extras: other trained modules (a projection head, a projector, a critic), checkpointed.
        frozen: modules used but not trained (a VAE, an encoder, a base UNet).
        find_unused_parameters: some trained parameters take no part in some steps (DDP needs to know).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFunction, extras: dict[str, nn.Module] | None = None,
                 frozen: dict[str, nn.Module] | None = None, find_unused_parameters: bool = False) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(extras or {})
        self.loss_fn = loss_fn
        self.find_unused_parameters = find_unused_parameters
        object.__setattr__(self, "frozen", dict(frozen or {}))  # not registered: not trained, not saved
        for module in self.frozen.values():
            module.eval().requires_grad_(False)

    frozen: dict[str, nn.Module]

    def forward(self, batch: Any, draws: Any) -> dict[str, torch.Tensor]:  # noqa: D102
        return self.loss_fn(self, batch, draws)

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Return the dtype the frozen modules run in (float32 unless the loop cast them for mixed precision)."""
        for module in self.frozen.values():
            for p in module.parameters():
                return p.dtype
        return torch.float32

    @staticmethod
    def full_precision(device: torch.device | str) -> torch.autocast:
        """Return a context without mixed-precision autocast, for data preparation (stain maths, augmentation).

        The loop runs the loss function under the accelerator's autocast; colour transforms and
        least-squares stain separation need float32 whatever the training precision.
        """
        return torch.autocast(device_type=torch.device(device).type, enabled=False)

    def trained_parameters(self) -> list[nn.Parameter]:
        """Return the parameters the optimizer updates (those requiring gradients), in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]
