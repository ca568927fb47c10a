"""Streaming tile engine: read windows, process them in batches, blend overlaps, emit strips.

A level of ``width × height`` pixels is cut into output tiles of ``tile`` pixels. Each output
tile is computed from a *window* that extends ``overlap`` pixels beyond it on every side.

* ``overlap == 0``: windows are the tiles; outputs are pasted as they are. Classical
  normalizers with per-slide statistics are seam-free this way by construction.
* ``overlap > 0``: neighbouring windows share a band of ``2·overlap`` pixels where their outputs
  are blended with feathering weights (cosine or linear ramps that sum to one), so a
  tile-dependent method (a neural normalizer) has no visible step at tile boundaries.

Output leaves as horizontal strips (one row of tiles, full width) in order, and the engine
holds at most one row of windows: memory scales with width × tile, never with slide area.
Windows judged background by ``is_foreground`` skip the processor and keep their pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#: Reads a window ``(x, y, w, h)`` in level coordinates (outside the level: white) → uint8 ``(h,w,3)``.
WindowReader = Callable[[int, int, int, int], np.ndarray]
#: Processes a batch of same-size uint8 windows ``(B,h,w,3)`` → uint8 or float-in-[0,255] ``(B,h,w,3)``.
BatchProcessor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TileGrid:
    """Output tiles of a ``width × height`` level and the windows that compute them.

    Example:
        >>> grid = TileGrid(1000, 600, tile=256, overlap=32)
        >>> grid.rows, grid.cols, grid.window(0, 1)
        (3, 4, (224, -32, 320, 320))
    """

    width: int
    height: int
    tile: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise ValueError(f"tile: expected at least 16 pixels, got {self.tile}")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"overlap: expected 0..tile/2 ({self.tile // 2}), got {self.overlap}")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"width/height: expected positive sizes, got {self.width}x{self.height}")

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile)

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile)

    @property
    def window_size(self) -> int:
        return self.tile + 2 * self.overlap

    def window(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(x, y, w, h)`` of the window computing tile ``(row, col)``, in level pixels."""
        return col * self.tile - self.overlap, row * self.tile - self.overlap, self.window_size, self.window_size

    def neighbourhood(self, row: int, col: int) -> list[tuple[int, int]]:
        """Output tiles that window ``(row, col)`` contributes to."""
        reach = 1 if self.overlap else 0
        return [
            (r, c)
            for r in range(max(row - reach, 0), min(row + reach + 1, self.rows))
            for c in range(max(col - reach, 0), min(col + reach + 1, self.cols))
        ]


def feather_weights(size: int, overlap: int, kind: str = "cosine") -> np.ndarray:
    """1-D blending weights of a window of ``size`` whose ends overlap neighbours by ``2·overlap``.

    The ramps of two neighbours sum to one across their shared band (a partition of unity),
    and every weight is positive.

    Example:
        >>> w = feather_weights(320, 32)
        >>> float(w[0] + w[256]), float(w[160])
        (1.0, 1.0)
    """
    if overlap == 0:
        return np.ones(size, np.float32)
    if kind not in ("cosine", "linear"):
        raise ValueError(f"kind: expected 'cosine' or 'linear', got {kind!r}")
    band = 2 * overlap
    position = np.arange(size, dtype=np.float64) + 0.5
    t = np.clip(np.minimum(position, size - position) / band, 0.0, 1.0)
    ramp = t if kind == "linear" else 0.5 - 0.5 * np.cos(np.pi * t)
    return ramp.astype(np.float32)


def iter_strips(
    read: WindowReader,
    grid: TileGrid,
    process: BatchProcessor,
    is_foreground: Callable[[int, int], bool] = lambda row, col: True,
    skip: set[tuple[int, int]] | frozenset = frozenset(),
    batch_size: int = 16,
    feather: str = "cosine",
    on_window: Callable[[int, int, bool], None] | None = None,
    prefetch: bool = True,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(row, strip)`` for every tile row: uint8 ``(h, width, 3)``, ``h ≤ tile``.

    Args:
        read: window reader (level coordinates; outside the level returns white).
        grid: output tiles and windows.
        process: batch processor for foreground windows.
        is_foreground: whether window ``(row, col)`` holds tissue (else it keeps its pixels).
        skip: output tiles already written (resume); windows contributing only to them are
            not read, and their pixels in the strip are undefined (white).
        batch_size: windows per ``process`` call.
        feather: ``"cosine"`` or ``"linear"`` blending ramps (overlap only).
        on_window: progress callback ``(row, col, processed)`` after each window.
        prefetch: read the next row of windows in a background thread while this one is
            processed (reading and decoding release the GIL).
    """
    assembler = _StripAssembler(grid, feather)

    def load(row: int) -> list[tuple[int, np.ndarray, bool]]:
        cols = [c for c in range(grid.cols) if not all(n in skip for n in grid.neighbourhood(row, c))]
        return [(col, read(*grid.window(row, col)), is_foreground(row, col)) for col in cols]

    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
    try:
        upcoming = pool.submit(load, 0) if pool else None
        for row in range(grid.rows):
            loaded = upcoming.result() if upcoming else load(row)
            if pool and row + 1 < grid.rows:
                upcoming = pool.submit(load, row + 1)
            assembler.start_row(row)
            _process_row(loaded, row, process, batch_size, on_window, assembler.add)
            del loaded  # release this row's windows before the next row is read
            yield from assembler.finish_row()
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


class _StripAssembler:
    """Paste (overlap 0) or feather-blend (overlap > 0) a row of window outputs into strips.

    With overlap, an accumulator covers level rows ``[y_r − o, y_r + t + o)`` of the current
    window row; after the row, ``[y_r − o, y_r + t − o)`` is final (the next row starts at
    ``y_r + t − o``) and the bottom ``2o`` rows carry over.
    """

    def __init__(self, grid: TileGrid, feather: str) -> None:
        self.grid = grid
        o, t = grid.overlap, grid.tile
        weights = feather_weights(grid.window_size, o, feather)
        self.weight = weights[:, None, None] * weights[None, :, None]
        self.total_y = _total_weights(grid.rows, t, o, weights)
        self.total_x = _total_weights(grid.cols, t, o, weights)
        self.carry: np.ndarray | None = None
        self.pending: list[np.ndarray] = []
        self.emit_row = 0

    def start_row(self, row: int) -> None:
        """Begin window row ``row``: a white strip (overlap 0) or an accumulator (overlap > 0)."""
        grid, o, t = self.grid, self.grid.overlap, self.grid.tile
        self.row = row
        if o == 0:
            self.strip = np.full((min(t, grid.height - row * t), grid.width, 3), 255, np.uint8)
            return
        self.acc = np.zeros((grid.window_size, grid.cols * t + 2 * o, 3), np.float32)
        if self.carry is not None:
            self.acc[: 2 * o] = self.carry

    def add(self, col: int, out: np.ndarray) -> None:
        """Paste or blend the output of window ``(row, col)``."""
        o, t, w = self.grid.overlap, self.grid.tile, self.grid.width
        if o == 0:
            x = col * t
            self.strip[:, x : x + t] = out[: self.strip.shape[0], : min(t, w - x)]
        else:
            self.acc[:, col * t : col * t + self.grid.window_size] += self.weight * out.astype(np.float32)

    def finish_row(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield the strips this row completed."""
        grid, row = self.grid, self.row
        o, t, w = grid.overlap, grid.tile, grid.width
        if o == 0:
            strip, self.strip = self.strip, None
            yield row, strip
            return
        acc, self.acc = self.acc, None
        y0 = row * t - o  # level y of acc[0]
        last = row == grid.rows - 1
        stop = grid.height if last else y0 + t  # rows [y0, stop) are final now
        lo = max(0, -y0)
        norm = self.total_y[o + y0 + lo : o + stop, None, None] * self.total_x[None, :, None]
        finished = acc[lo : stop - y0] / norm
        self.pending.append(np.clip(np.rint(finished[:, o : o + w]), 0, 255).astype(np.uint8))
        self.carry = acc[t : t + 2 * o].copy()
        del acc, finished
        ready = np.concatenate(self.pending, axis=0) if len(self.pending) > 1 else self.pending[0]
        while ready.shape[0] >= t or (last and ready.shape[0] > 0):
            yield self.emit_row, ready[:t]
            ready = ready[t:]
            self.emit_row += 1
        self.pending = [ready] if ready.shape[0] else []


def _total_weights(count: int, tile: int, overlap: int, weights: np.ndarray) -> np.ndarray:
    """Sum of all ``count`` windows' 1-D weights over ``[-overlap, count·tile + overlap)``."""
    total = np.zeros(count * tile + 2 * overlap, np.float64)
    for i in range(count):
        total[i * tile : i * tile + weights.shape[0]] += weights
    return total.astype(np.float32)


def _process_row(
    loaded: list[tuple[int, np.ndarray, bool]],
    row: int,
    process: BatchProcessor,
    batch_size: int,
    on_window: Callable[[int, int, bool], None] | None,
    sink: Callable[[int, np.ndarray], None],
) -> None:
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        result = process(np.stack([window for _, window in batch]))
        if result.shape[0] != len(batch) or result.shape[1:3] != batch[0][1].shape[:2]:
            raise ValueError(f"process: expected output shape {(len(batch), *batch[0][1].shape)}, got {result.shape}")
        for (col, _), out in zip(batch, result, strict=True):
            sink(col, out)
            if on_window:
                on_window(row, col, True)
        batch.clear()

    for col, window, foreground in loaded:
        if foreground:
            batch.append((col, window))
            if len(batch) >= batch_size:
                flush()
        else:
            sink(col, window)
            if on_window:
                on_window(row, col, False)
    flush()
