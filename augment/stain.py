"""Random stain transforms for dataloaders, built on kornia's intensity augmentation base.

Each transform draws its parameters (schema in :mod:`augment.params`) with torch's global RNG,
so ``DataLoader`` workers, which torch seeds differently, draw differently. They accept uint8
or float images of rank 3 or 4 and return the same dtype and rank, support ``p``,
``same_on_batch`` and replay with ``params=``, pickle, and run inside torchvision v2
``Compose`` and kornia ``AugmentationSequential`` (they change colour only, so masks, boxes and
keypoints pass through unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from augment.base import IntensityAugmentationBase2D, ReplayableImageMixin
from augment.functional import hed_jitter, lab_transfer, lab_transfer_uint8, stain_jitter
from genpath.image_tensor import to_float_batch
from normalization.functional import lab_statistics, rgb_to_od, tissue_mask_od

Range = tuple[float, float]


def _as_range(value: float | Sequence[float], centre: float, name: str) -> Range:
    """``value`` as (low, high): a number means ``centre ± value``."""
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative spread, got {value}")
        return centre - float(value), centre + float(value)
    low, high = (float(v) for v in value)
    if low > high:
        raise ValueError(f"{name}: expected (low, high) with low <= high, got ({low}, {high})")
    return low, high


def _uniform(n: int, shape: tuple[int, ...], bounds: Range, same_on_batch: bool) -> torch.Tensor:
    low, high = bounds
    draw = torch.rand((1 if same_on_batch else n, *shape))
    return (low + (high - low) * draw).expand(n, *shape).clone()


class StainAugmentationBase(ReplayableImageMixin, IntensityAugmentationBase2D):
    """Common dtype/rank handling and parameter checks for genpath's stain (intensity) transforms."""


class RandomHEDJitter(StainAugmentationBase):
    """Random scale and shift of haematoxylin, eosin and DAB concentrations (Tellez et al. 2018).

    Args:
        scale: range of the factor, or a spread ``s`` meaning ``(1 - s, 1 + s)``.
        shift: range of the shift, or a spread ``s`` meaning ``(-s, s)``.
        p: probability of transforming each sample.
        same_on_batch: one draw for the whole batch.

    Shape:
        ``(B,3,H,W)`` or ``(3,H,W)``, uint8 or float; output alike.

    Example:
        >>> aug = RandomHEDJitter(scale=0.05, shift=0.05, p=1.0)
        >>> x = torch.rand(2, 3, 16, 16)
        >>> torch.equal(aug(x), aug(x, params=aug._params))
        True
    """

    param_keys = ("hed_scale", "hed_shift")

    def __init__(
        self,
        scale: float | Sequence[float] = 0.05,
        shift: float | Sequence[float] = 0.05,
        p: float = 0.5,
        same_on_batch: bool = False,
    ) -> None:
        super().__init__(p=p, same_on_batch=same_on_batch)
        self.scale = _as_range(scale, 1.0, "scale")
        self.shift = _as_range(shift, 0.0, "shift")

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        n = batch_shape[0]
        return {
            "hed_scale": _uniform(n, (3,), self.scale, self.same_on_batch),
            "hed_shift": _uniform(n, (3,), self.shift, self.same_on_batch),
        }

    def apply_transform(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        return hed_jitter(input, params["hed_scale"], params["hed_shift"])


class RandomStainJitter(StainAugmentationBase):
    """Perturb each tile's Macenko stain vectors and its H and E concentrations.

    Args:
        vector_shift: spread of the uniform shift added to each OD vector component.
        concentration_scale: range (or spread around 1) of the H and E concentration factors.
        concentration_shift: range (or spread around 0) of the concentration shifts.
        p: probability of transforming each sample.
        same_on_batch: one draw for the whole batch.

    Example:
        >>> RandomStainJitter(p=1.0)(torch.rand(3, 16, 16)).shape
        torch.Size([3, 16, 16])
    """

    param_keys = ("stain_vector_shift", "concentration_scale", "concentration_shift")

    def __init__(
        self,
        vector_shift: float = 0.05,
        concentration_scale: float | Sequence[float] = 0.2,
        concentration_shift: float | Sequence[float] = 0.1,
        p: float = 0.5,
        same_on_batch: bool = False,
    ) -> None:
        super().__init__(p=p, same_on_batch=same_on_batch)
        self.vector_shift = _as_range(vector_shift, 0.0, "vector_shift")
        self.concentration_scale = _as_range(concentration_scale, 1.0, "concentration_scale")
        self.concentration_shift = _as_range(concentration_shift, 0.0, "concentration_shift")

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        n = batch_shape[0]
        return {
            "stain_vector_shift": _uniform(n, (3, 2), self.vector_shift, self.same_on_batch),
            "concentration_scale": _uniform(n, (2,), self.concentration_scale, self.same_on_batch),
            "concentration_shift": _uniform(n, (2,), self.concentration_shift, self.same_on_batch),
        }

    def apply_transform(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        return stain_jitter(
            input, params["stain_vector_shift"], params["concentration_scale"], params["concentration_shift"]
        )


@dataclass(frozen=True)
class StainNAStatistics:
    """Dataset distribution of per-image LAB statistics (RandStainNA's "virtual stain templates").

    Each field is a length-3 list over L, A, B: the mean and spread, across images, of each
    image's channel mean and channel standard deviation.
    """

    mean_of_means: list[float]
    std_of_means: list[float]
    mean_of_stds: list[float]
    std_of_stds: list[float]

    @classmethod
    def fit(cls, images: torch.Tensor | Sequence[torch.Tensor], tissue_only: bool = True) -> StainNAStatistics:
        """Estimate the distribution from images (a batch, or a list of images of any size)."""
        items = [images] if isinstance(images, torch.Tensor) else list(images)
        means, stds = [], []
        for i, image in enumerate(items):
            rgb, _ = to_float_batch(image, f"images[{i}]")
            mask = tissue_mask_od(rgb_to_od(rgb)) if tissue_only else None
            mean, std = lab_statistics(rgb, mask)
            means.append(mean)
            stds.append(std)
        m, s = torch.cat(means), torch.cat(stds)
        if m.shape[0] < 2:
            raise ValueError(f"images: expected at least 2 images to fit a distribution, got {m.shape[0]}")
        return cls(m.mean(0).tolist(), m.std(0).tolist(), s.mean(0).tolist(), s.std(0).tolist())

    def to_dict(self) -> dict[str, list[float]]:
        """Plain dict, e.g. for YAML."""
        return asdict(self)


class RandomStainNA(StainAugmentationBase):
    """RandStainNA (Shen et al. 2022): Reinhard transfer to LAB statistics drawn per sample.

    Target channel means and stds are drawn from normal distributions fitted on a dataset
    (:meth:`StainNAStatistics.fit`), with their spread multiplied by ``spread``.

    Args:
        statistics: the fitted distribution (or its dict form).
        spread: factor on the fitted spreads (RandStainNA's ``std_hyper`` is ``spread - 1``).
        p: probability of transforming each sample.
        same_on_batch: one draw for the whole batch.

    Example:
        >>> stats = StainNAStatistics([60, 20, -10], [5, 3, 3], [15, 8, 6], [2, 1, 1])
        >>> RandomStainNA(stats, p=1.0)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    param_keys = ("lab_mean", "lab_std")

    def __init__(
        self,
        statistics: StainNAStatistics | dict[str, list[float]],
        spread: float = 1.0,
        p: float = 0.5,
        same_on_batch: bool = False,
    ) -> None:
        super().__init__(p=p, same_on_batch=same_on_batch)
        if isinstance(statistics, dict):
            statistics = StainNAStatistics(**statistics)
        if spread < 0:
            raise ValueError(f"spread: expected a non-negative factor, got {spread}")
        self.statistics, self.spread = statistics, float(spread)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        n = 1 if self.same_on_batch else batch_shape[0]
        st = self.statistics

        def draw(mean: list[float], std: list[float]) -> torch.Tensor:
            noise = torch.randn(n, 3)
            return torch.tensor(mean) + self.spread * torch.tensor(std) * noise

        lab_mean = draw(st.mean_of_means, st.std_of_means)
        lab_mean[:, 0] = lab_mean[:, 0].clamp(0.0, 100.0)
        lab_std = draw(st.mean_of_stds, st.std_of_stds).clamp(min=0.1)
        size = batch_shape[0]
        return {"lab_mean": lab_mean.expand(size, 3).clone(), "lab_std": lab_std.expand(size, 3).clone()}

    def apply_transform(
        self, input: torch.Tensor, params: dict[str, torch.Tensor], flags: dict[str, Any], transform: Any = None
    ) -> torch.Tensor:
        if getattr(self, "_from_uint8", False):  # bytes / 255: the byte-table path, within a level
            return lab_transfer_uint8(input, params["lab_mean"], params["lab_std"])
        mask = tissue_mask_od(rgb_to_od(input))
        # Tiles with (almost) no tissue use all pixels, so their statistics stay defined.
        mask = mask | (mask.flatten(1).sum(-1) < 64)[:, None, None]
        return lab_transfer(input, params["lab_mean"], params["lab_std"], mask)
