"""``genpath preview augment|normalize``: labelled grids to choose augmentation ranges and normalization by eye."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import console, user_errors

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Preview augmentations or normalization on a few images as a labelled grid PNG.")

Out = Annotated[Path, typer.Option("--out", "-o", help="Grid image to write (.png or .jpg).")]


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"out: expected a .png or .jpg file name, got {out}")
    if out.is_dir():
        raise ValueError(f"out: expected a file name, got the folder {out}")


@app.command("augment", no_args_is_help=True)
@user_errors
def augment(
    image: Annotated[Path, typer.Argument(help="An image file (a tile, or a larger image: its centre is used).")],
    out: Out,
    transform: Annotated[str, typer.Option(help="hed, stain, stainna or histology.")] = "hed",
    strength: Annotated[float, typer.Option(help="Scale of the default ranges (histology: 0..1).")] = 1.0,
    n: Annotated[int, typer.Option("--n", help="Cells in the grid; the first is the original.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the draws (same seed, same grid).")] = 0,
    size: Annotated[int, typer.Option(help="Centre crop (pixels) the transforms see.")] = 256,
) -> None:
    """Write a grid of IMAGE under N draws of a transform, each cell labelled with its parameter values."""
    from augment.preview import check_preview_args, preview_grid
    from genpath.report.grid import save_grid

    check_preview_args(transform, n, strength, seed)  # before reading anything
    _check_out(out)
    if size < 16:
        raise ValueError(f"size: expected at least 16 pixels, got {size}")
    grid = preview_grid(image, transform=transform, n=n, strength=strength, seed=seed, size=size)
    save_grid(grid, out)
    console.print(f"wrote {out} ({n} cells, {transform}, strength {strength:g}, seed {seed})", highlight=False)


@app.command("normalize", no_args_is_help=True)
@user_errors
def normalize(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or globs (at most 64 images).")],
    target: Annotated[list[str], typer.Option(help="Target image(s) to fit on (repeat to pool several).")],
    out: Out,
    method: Annotated[list[str], typer.Option(help="Method; repeat for one column per method.")] = ["macenko"],  # noqa: B006
    model: Annotated[str | None, typer.Option(help="Model folder of the stainfuser method.")] = None,
    size: Annotated[int | None, typer.Option(help="Centre crop (pixels) of each image; default whole.")] = None,
) -> None:
    """Write a grid: the target, then per image the original and each method's result, labelled."""
    from genpath.report.grid import save_grid
    from normalization import available_methods
    from normalization.preview import normalize_preview_grid

    _check_out(out)
    bad = [m for m in method if m not in available_methods()]
    if bad:
        raise ValueError(f"method: expected names from {available_methods()}, got {bad[0]!r}")
    if "stainfuser" in method:
        import genpath.pipelines.stainfuser_normalizer  # noqa: F401 - registers the plugin in a source checkout
    options = {"stainfuser": {"model": model}} if model else {}
    grid = normalize_preview_grid(images, method, target, options=options, size=size)
    save_grid(grid, out)
    console.print(f"wrote {out} ({', '.join(method)})", highlight=False)
