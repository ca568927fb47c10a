"""Feature-space augmentation for bag-of-embeddings (MIL) training with a trained HistAug model.

:class:`HistAugTransform` augments one bag ``(N,D)`` or a batch of bags ``(B,N,D)`` in a single
forward pass. Use it in the training step (on the GPU, next to the MIL model) or in a
``DataLoader`` collate function (:class:`HistAugCollate`, picklable for workers).

Both kinds of HistAug work: genpath's own (:class:`~augment.histaug.HistAugModel`) and the
official releases (:class:`~augment.histaug_official.OfficialHistAugModel`, loaded from their
transformers folder without running its code); :func:`load_histaug` tells them apart by
``config.json``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from augment.histaug import HistAugModel
from augment.histaug_official import OfficialHistAugModel, load_official_histaug, read_model_type

_MODES = {"wsi": "wsi", "wsi_wise": "wsi", "patch": "patch", "instance_wise": "patch"}


def load_histaug(folder: str | Path) -> HistAugModel | OfficialHistAugModel:
    """Load a HistAug folder, float32, never the network: genpath's own or an official release.

    ``config.json`` with ``model_type: "histaug"`` (the official ``sofieneb/histaug-*`` releases)
    loads :class:`~augment.histaug_official.OfficialHistAugModel` (strict, ``histaug.`` prefix
    stripped, safetensors or ``pytorch_model.bin`` with ``weights_only``); anything else loads
    genpath's :class:`HistAugModel` (safetensors only).

    Raises:
        FileNotFoundError: ``folder`` is not an existing local folder (a Hub id is refused at
            once instead of being looked up).
        ValueError: the folder holds no HistAug weights, or weights that do not match its config.
    """
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model: expected a local HistAug folder, got {folder} (missing; genpath never "
                                "downloads)")
    if read_model_type(path) == "histaug":
        return load_official_histaug(path)
    try:
        return HistAugModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                            use_safetensors=True)
    except OSError as error:
        raise ValueError(f"model: expected HistAug weights (config.json + safetensors) in {folder}, got "
                         f"{str(error).splitlines()[0]}") from None


class HistAugTransform(nn.Module):
    """Augment bags of patch embeddings with a frozen HistAug model.

    Args:
        model: a trained :class:`~augment.histaug.HistAugModel`, an
            :class:`~augment.histaug_official.OfficialHistAugModel`, or the folder of either.
        p: probability that a bag is augmented at all.
        mode: ``"wsi"`` (one draw per bag, the paper's recommendation) or ``"patch"``; the
            official names ``"wsi_wise"`` and ``"instance_wise"`` mean the same.
        strength: shrinks the transform ranges towards the identity (0..1); for an official
            model it scales the continuous values (the discrete ones keep their probabilities).

    Shape:
        ``(N,D)`` or ``(B,N,D)`` -> same shape, dtype and device.

    Example:
        >>> model = HistAugModel(embed_dim=32, num_chunks=4, hidden_dim=16, depth=1, num_heads=2)
        >>> HistAugTransform(model, p=1.0)(torch.randn(10, 32)).shape
        torch.Size([10, 32])
    """

    def __init__(
        self, model: HistAugModel | OfficialHistAugModel | str | Path, p: float = 0.5, mode: str = "wsi",
        strength: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(model, str | Path):
            model = load_histaug(model)
        if not isinstance(model, HistAugModel | OfficialHistAugModel):
            raise TypeError(f"model: expected a HistAug model or folder, got {type(model).__name__}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a probability in [0, 1], got {p}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected 'wsi' or 'patch' (or 'wsi_wise', 'instance_wise'), got {mode!r}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
        self.model = model.eval().requires_grad_(False)
        self.p, self.mode, self.strength = float(p), _MODES[mode], float(strength)

    @torch.no_grad()
    def forward(self, bags: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment each bag with probability ``p`` (torch's RNG, or ``generator``)."""
        single = bags.ndim == 2
        x = bags[None] if single else bags
        if x.ndim != 3:
            raise ValueError(f"bags: expected (N,D) or (B,N,D), got shape {tuple(bags.shape)}")
        chosen = (torch.rand(x.shape[0], generator=generator) < self.p).nonzero().flatten()
        out = x.clone()
        if len(chosen) and isinstance(self.model, OfficialHistAugModel):
            out[chosen] = self._official(x[chosen], generator)
        elif len(chosen):
            sub = x[chosen]
            if self.mode == "wsi":
                params = self.model.sample_params(len(chosen), mode="patch", generator=generator,
                                                  strength=self.strength)  # one draw per bag
                out[chosen] = self.model(sub, params)
            else:
                n = sub.shape[0] * sub.shape[1]
                params = self.model.sample_params(n, mode="patch", generator=generator, strength=self.strength)
                out[chosen] = self.model(sub.reshape(n, -1), params).reshape(sub.shape)
        return out[0] if single else out

    def _official(self, bags: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Augment ``(B,N,D)`` bags with an official model: one ``wsi_wise`` draw per bag, or ``instance_wise``."""
        b, n, d = bags.shape
        flat = bags.reshape(b * n, d)
        sample = self.model.sample_aug_params
        if self.mode == "patch":
            params = sample(b * n, flat.device, "instance_wise", generator=generator, strength=self.strength)
        else:
            draws = [sample(n, flat.device, "wsi_wise", generator=generator, strength=self.strength) for _ in range(b)]
            params = OrderedDict((k, (torch.cat([p[k][0] for p in draws]), torch.cat([p[k][1] for p in draws])))
                                 for k in draws[0])
        return self.model(flat, params).reshape(b, n, d)


class HistAugCollate:
    """Collate ``(bag, label)`` items into a list of augmented bags and a label tensor (bags differ in size).

    Args:
        transform: the :class:`HistAugTransform` (None: no augmentation, e.g. for validation).
    """

    def __init__(self, transform: HistAugTransform | None) -> None:
        self.transform = transform

    def __call__(self, items: Sequence[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
        bags = [bag if self.transform is None else self.transform(bag) for bag, _ in items]
        return bags, torch.tensor([int(label) for _, label in items])
