"""Random draws of a training step made per sample, so that they do not depend on how a batch is split.

Every random number a trainer needs (diffusion noise, timesteps, flips, condition dropout) is
drawn from a generator seeded by ``(seed, step, sample id, stream)``. A sample therefore gets
the same draws whether it sits in a batch of 8 on one process or a batch of 4 on each of two
processes, whether gradients are accumulated, and whether the run was resumed: the loss curve
of a distributed run matches the single-process one (``tests/training/test_distributed.py``).

Example:
    >>> import torch
    >>> draws = StepDraws(seed=0, step=3, ids=torch.tensor([5, 9]))
    >>> whole = draws.normal((2,))
    >>> whole.shape
    torch.Size([2, 2])
    >>> torch.equal(whole[1], StepDraws(seed=0, step=3, ids=torch.tensor([9])).normal((2,))[0])
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_STREAMS: dict[str, int] = {}


def _stream_number(name: str) -> int:
    import zlib

    return _STREAMS.setdefault(name, zlib.crc32(name.encode()) & 0xFFFF)


def sample_seed(seed: int, step: int, sample_id: int, stream: str) -> int:
    """Return the seed of one sample's generator for one named stream of draws at one step.

    Example:
        >>> sample_seed(0, 1, 2, "noise") == sample_seed(0, 1, 2, "noise") != sample_seed(0, 1, 3, "noise")
        True
    """
    import hashlib

    key = f"{seed}:{step}:{sample_id}:{_stream_number(stream)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


@dataclass
class StepDraws:
    """Per-sample random draws of one step (see the module docstring).

    Attributes:
        seed: the run's seed (``train.seed``).
        step: the optimizer step being computed (0-based).
        ids: ``(B,)`` global dataset indices of the batch's samples.
    """

    seed: int
    step: int
    ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.numel())

    def _generators(self, stream: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(self.seed, self.step, int(i), stream))
                for i in self.ids.tolist()]

    def normal(self, shape: tuple[int, ...], device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, stream: str = "noise") -> torch.Tensor:
        """Draw standard normal numbers, one ``shape`` per sample.

        Shape:
            returns ``(B, *shape)``.
        """
        out = torch.stack([torch.randn(shape, generator=g) for g in self._generators(stream)])
        return out.to(device=device, dtype=dtype)

    def uniform(self, shape: tuple[int, ...] = (), device: torch.device | str | None = None,
                stream: str = "uniform") -> torch.Tensor:
        """Draw uniform numbers in [0, 1), one ``shape`` per sample.

        Shape:
            returns ``(B, *shape)`` float32.
        """
        return torch.stack([torch.rand(shape, generator=g) for g in self._generators(stream)]).to(device)

    def integers(self, high: int, shape: tuple[int, ...] = (), device: torch.device | str | None = None,
                 stream: str = "integers") -> torch.Tensor:
        """Draw integers in ``[0, high)``, one ``shape`` per sample.

        Shape:
            returns ``(B, *shape)`` int64.
        """
        return torch.stack([torch.randint(0, high, shape, generator=g) for g in self._generators(stream)]).to(device)

    def dihedral(self, images: list[torch.Tensor], stream: str = "dihedral") -> list[torch.Tensor]:
        """Apply one random flip/90° rotation per sample, the same for every tensor of ``images``.

        Shape:
            each tensor ``(B, ..., H, W)`` with ``H == W``; returned alike.
        """
        k = self.integers(4, stream=stream + ".rotation").tolist()
        flip = (self.uniform(stream=stream + ".flip") < 0.5).tolist()
        out = []
        for x in images:
            rows = [torch.rot90(x[i], k[i], (-2, -1)) for i in range(len(self))]
            out.append(torch.stack([r.flip(-1) if f else r for r, f in zip(rows, flip, strict=True)]))
        return out

    def flip(self, images: torch.Tensor, stream: str = "flip") -> torch.Tensor:
        """Flip each sample horizontally and vertically at random.

        Shape:
            ``(B, C, H, W)``; returned alike.
        """
        f = self.uniform((2,), stream=stream) < 0.5
        out = torch.where(f[:, 0, None, None, None].to(images.device), images.flip(-1), images)
        return torch.where(f[:, 1, None, None, None].to(images.device), out.flip(-2), out)
