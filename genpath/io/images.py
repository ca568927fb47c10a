"""Image files in and out: PNG, JPEG and TIFF tiles as uint8 ``(3,H,W)`` tensors."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genpath.utils.atomic import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def read_image(path: str | Path) -> torch.Tensor:
    """Read an RGB image file as a uint8 ``(3,H,W)`` tensor; alpha is composited onto white.

    Example:
        >>> read_image("samples/tiles/crc/TUM-TCGA-DRHQMTQA.png").shape  # doctest: +SKIP
        torch.Size([3, 224, 224])
    """
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def write_image(image: torch.Tensor, path: str | Path, quality: int = 95) -> Path:
    """Write a uint8 or float ``(3,H,W)`` tensor atomically (temporary file, then rename)."""
    path = Path(path)
    if image.is_floating_point():
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"image: expected finite values to write {path}, got NaN or infinity")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    array = image.detach().cpu().permute(1, 2, 0).numpy()
    kwargs = {"quality": quality} if path.suffix.lower() in {".jpg", ".jpeg"} else {}
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, **kwargs)  # the temporary name keeps the suffix: same format
    return path


def expand_inputs(inputs: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """Expand files, folders (recursively) and glob patterns into ``(file, relative name)`` pairs.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found.extend((p, p.relative_to(path)) for p in files)
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise FileNotFoundError(f"inputs: expected an image file, folder or glob, got {item!r} (no match)")
            found.extend((m, Path(m.name)) for m in files)
    return found


def plan_outputs(
    files: list[tuple[Path, Path]], out: str | Path, output_format: str
) -> list[tuple[Path, Path, str | None]]:
    """Give each input file its output path under ``out``, refusing those that would destroy data.

    An output that is one of the inputs, or that an earlier input already claimed (``a.jpg`` and
    ``a.png`` both becoming ``a.png``), gets an error instead of being written.

    Args:
        files: ``(file, relative name)`` pairs from :func:`expand_inputs`.
        out: output folder.
        output_format: ``png``, ``jpg``, ``tif`` (the suffix) or ``same`` (each input's own).

    Returns:
        ``(file, destination, error)`` per input, ``error`` None when it may be written.

    Example:
        >>> plan = plan_outputs([(Path("in/a.jpg"), Path("a.jpg")), (Path("in/a.png"), Path("a.png"))], "o", "png")
        >>> [(d.as_posix(), e is None) for _, d, e in plan]
        [('o/a.png', True), ('o/a.png', False)]
    """
    out = Path(out)
    inputs = {path.resolve() for path, _ in files}
    claimed: dict[Path, Path] = {}
    plan = []
    for path, relative in files:
        suffix = relative.suffix if output_format == "same" else f".{output_format}"
        destination = out / relative.with_suffix(suffix)
        key = destination.resolve()
        error = None
        if key in inputs:
            error = f"out: writing {destination} would overwrite an input"
        elif claimed.setdefault(key, path) != path:
            error = f"out: {path} and {claimed[key]} would both write {destination}"
        plan.append((path, destination, error))
    return plan

