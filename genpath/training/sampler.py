"""One seeded stream of sample ids for the whole run, cut into each process's micro-batches.

Epoch ``e`` of the stream is a permutation of the dataset drawn from ``(seed, e)``; optimizer
step ``s`` consumes the next ``batch_size × processes × accumulation`` ids of the stream. Which
samples a step sees therefore depends only on the global batch, not on how it is split over
processes or micro-batches, and a run resumes at any step from the number of samples seen
(also with another number of processes).

Example:
    >>> from itertools import islice
    >>> one = list(islice(RankBatchSampler(10, 4, rank=0, world_size=1, seed=0), 2))
    >>> two = [list(islice(RankBatchSampler(10, 2, rank=r, world_size=2, seed=0), 2)) for r in (0, 1)]
    >>> one[0] == two[0][0] + two[1][0] and one[1] == two[0][1] + two[1][1]
    True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def stream_ids(length: int, seed: int, start: int, count: int, shuffle: bool = True) -> list[int]:
    """Return ids ``start .. start + count`` of the run's sample stream (epochs of seeded permutations).

    Example:
        >>> sorted(stream_ids(5, seed=1, start=0, count=5))
        [0, 1, 2, 3, 4]
        >>> stream_ids(5, seed=1, start=3, count=4) == stream_ids(5, seed=1, start=0, count=7)[3:]
        True
    """
    out: list[int] = []
    position = start
    while len(out) < count:
        epoch, offset = divmod(position, length)
        if shuffle:
            order = torch.randperm(length, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        else:
            order = list(range(length))
        take = order[offset : offset + count - len(out)]
        out.extend(take)
        position += len(take)
    return out


class RankBatchSampler(Sampler[list[int]]):
    """Endless micro-batches of one process, from the run's stream of sample ids.

    Micro-batch ``k`` (counted from ``start``) of process ``rank`` holds stream ids
    ``start + k·B·W + rank·B`` to ``... + B`` (``B`` the per-process batch, ``W`` the world size).

    Args:
        length: dataset length.
        batch_size: samples per process per micro-batch.
        rank: this process's index.
        world_size: number of processes.
        seed: the run's seed (the permutation of each epoch).
        start: stream position to begin at (samples seen by all processes before this run).
        shuffle: permute each epoch (False: the dataset order, repeated).
    """

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0,
                 shuffle: bool = True) -> None:
        if length < 1:
            raise ValueError(f"dataset: expected at least one sample, got {length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < {world_size}, got {rank}")
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.start, self.shuffle = seed, start, shuffle

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        stride = self.batch_size * self.world_size
        while True:
            yield stream_ids(self.length, self.seed, position + self.rank * self.batch_size, self.batch_size,
                             self.shuffle)
            position += stride


class IndexedDataset(Dataset):
    """Items ``(index, item)`` of a dataset, so that a step knows the ids of its samples."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, object]:
        return index, self.dataset[index]
