"""Labelled image grids: cells side by side with a few lines of text under each (PIL's default font).

Used by the augmentation and normalization previews and the synthetic contact sheet. Cells may
differ in size: each is shrunk to fit ``cell_size`` and centred; a missing cell (None) is
left blank but keeps its label.

Example:
    >>> import torch
    >>> grid = labelled_grid([torch.zeros(3, 32, 32, dtype=torch.uint8)] * 3, ["a", "b", "c"], columns=2)
    >>> grid.dtype, grid.shape[0]
    (torch.uint8, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["labelled_grid", "save_grid"]
_LINE = 12  # pixels per label line with PIL's default font at its default size


def _wrap(text: str, width: int, measure: Any) -> list[str]:
    """Split ``text`` into lines (at newlines, then words) that fit ``width`` pixels."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if line and measure(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def labelled_grid(
    cells: Sequence[Any | None],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    cell_size: int = 192,
    padding: int = 6,
    max_lines: int | None = None,
) -> torch.Tensor:
    r"""Lay ``cells`` out in a grid with ``labels`` under them; returns uint8 ``(3,H,W)``.

    Args:
        cells: images (tensors ``(3,h,w)``, arrays ``(h,w[,3])``, files) or None for a blank cell.
        labels: one text per cell (``\n`` starts a new line; long lines wrap); None: no labels.
        columns: cells per row (default: about square).
        cell_size: each cell is shrunk to fit a ``cell_size`` square (never enlarged).
        padding: white pixels around cells.
        max_lines: label lines per cell (default: as many as the longest label needs).

    Raises:
        ValueError: no cells, or not one label per cell.
    """
    from PIL import Image, ImageDraw, ImageFont

    from genpath.io.thumbnails import shrink

    if not cells:
        raise ValueError("cells: expected at least one image, got none")
    if labels is not None and len(labels) != len(cells):
        raise ValueError(f"labels: expected one label per cell ({len(cells)}), got {len(labels)}")
    columns = columns or int(np.ceil(np.sqrt(len(cells))))
    rows = int(np.ceil(len(cells) / columns))
    font = ImageFont.load_default()
    measure = (lambda text: font.getlength(text)) if hasattr(font, "getlength") else (lambda text: 6 * len(text))
    wrapped = [_wrap(t, cell_size, measure) for t in labels] if labels is not None else [[] for _ in cells]
    lines = max_lines if max_lines is not None else max((len(w) for w in wrapped), default=0)
    label_height = lines * _LINE + (4 if lines else 0)
    step_x, step_y = cell_size + padding, cell_size + label_height + padding
    canvas = Image.new("RGB", (columns * step_x + padding, rows * step_y + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for index, cell in enumerate(cells):
        x0 = padding + (index % columns) * step_x
        y0 = padding + (index // columns) * step_y
        if cell is not None:
            picture = shrink(cell, cell_size)
            h, w = picture.shape[:2]
            canvas.paste(Image.fromarray(picture), (x0 + (cell_size - w) // 2, y0 + (cell_size - h) // 2))
        for n, text in enumerate(wrapped[index][:lines]):
            draw.text((x0, y0 + cell_size + 2 + n * _LINE), text, fill=(20, 20, 20), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a grid from :func:`labelled_grid` as PNG (or JPEG by suffix) atomically; returns ``path``."""
    from genpath.io.images import write_image

    path = Path(path)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        raise ValueError(f"out: expected a .png, .jpg or .tif file name, got {path}")
    return write_image(grid, path)
