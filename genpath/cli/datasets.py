"""``genpath tiles`` and ``genpath embed``: tile datasets from slides, and their embeddings and MIL bags."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from genpath.cli.common import EXIT_FAILED_ITEMS, console, progress_bar, progress_bars, user_errors


@user_errors
def tiles(
    slides: Annotated[list[str], typer.Argument(help="Slide files, folders, glob patterns or CSV files (slide,mpp).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The dataset (a .zarr folder); a rerun resumes it.")],
    mpp: Annotated[float, typer.Option(help="Target resolution of the tiles, microns per pixel.")] = 0.5,
    tile_size: Annotated[int, typer.Option(help="Tile side in pixels at --mpp.")] = 256,
    min_tissue: Annotated[float, typer.Option(help="Lowest tissue share of a kept tile (0..1).")] = 0.5,
    max_tiles_per_slide: Annotated[int | None, typer.Option(help="Keep a seeded random subset of at most this "
                                                                 "many tiles per slide.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of that subset.")] = 0,
    slide_mpp: Annotated[float | None, typer.Option(help="Level-0 mpp of slides whose metadata has none.")] = None,
    executor: Annotated[str, typer.Option(help="local or dask.")] = "local",
    workers: Annotated[int, typer.Option(help="Slides tiled in parallel.")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address (default: a local "
                                                       "cluster).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Delete the dataset at --out (tiles and embeddings) and start "
                                                 "over.")] = False,
) -> None:
    """Cut tissue tiles at --mpp from slides into one zarr dataset (images, coords, slide_index, slides table).

    A rerun skips slides already done and redoes interrupted or failed ones; other settings
    than the dataset's are refused unless --overwrite. A slide that cannot be read is recorded
    as failed, the others are written, and the exit code is 1.
    """
    from genpath.wsi.tile_dataset import TileDatasetConfig, run_tile_dataset

    cfg = TileDatasetConfig(inputs=list(slides), out=str(out), mpp=mpp, tile_size=tile_size, min_tissue=min_tissue,
                            max_tiles_per_slide=max_tiles_per_slide, seed=seed, slide_mpp=slide_mpp,
                            executor=executor, workers=workers, scheduler=scheduler, overwrite=overwrite)
    counts = {"done": 0, "resumed": 0, "failed": 0, "tiles": 0}
    start = time.perf_counter()
    with progress_bars("slides", "tiles") as (update, tile_bar):

        def on_slide(row: dict) -> None:
            counts["resumed" if row.get("resumed") else row["status"]] += 1
            counts["tiles"] += 0 if row.get("resumed") else row["n_tiles"]
            update(advance=1)
            if row["status"] == "failed":
                console.print(f"[red]failed[/red] {escape(row['path'])}: {escape(row['error'])}", highlight=False,
                              soft_wrap=True)

        rows = run_tile_dataset(cfg, on_slide=on_slide,
                                tile_progress=lambda done, total: tile_bar(completed=done, total=total))
    seconds = time.perf_counter() - start
    failed = sum(r["status"] == "failed" for r in rows)
    rate = counts["tiles"] / max(seconds, 1e-9)
    console.print(f"slides tiled {counts['done']} ({counts['tiles']} tiles, {rate:.1f} tiles/s), "
                  f"already done (resumed) {counts['resumed']}, failed {failed}; dataset {out}", highlight=False,
                  soft_wrap=True)
    if failed:
        raise typer.Exit(code=EXIT_FAILED_ITEMS)


@user_errors
def embed(
    dataset: Annotated[Path, typer.Argument(help="A dataset made by 'genpath tiles'.")],
    encoder: Annotated[str, typer.Option(help="A registered encoder, NAME or NAME:WEIGHTS (a local folder or "
                                              "checkpoint), e.g. genpath-small.samples.")],
    batch_size: Annotated[int, typer.Option(help="Tiles per encoder call.")] = 64,
    device: Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda[:N] or mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32 or float16.")] = "float32",
    bags: Annotated[Path | None, typer.Option(help="Also write one MIL bag per slide (features, coords) into "
                                                   "this folder.")] = None,
    bags_format: Annotated[str, typer.Option(help="pt (torch.save of two tensors) or h5 (needs h5py).")] = "pt",
    overwrite: Annotated[bool, typer.Option(help="Recompute embeddings stored under this name with another "
                                                 "encoder, weights or dtype.")] = False,
) -> None:
    """Add embeddings/<encoder> (N,D) to a tile dataset; a rerun continues where it stopped."""
    from genpath.apps.embed_dataset import EmbedConfig, run_embed

    cfg = EmbedConfig(dataset=str(dataset), encoder=encoder, batch_size=batch_size, device=device, dtype=dtype,
                      bags=str(bags) if bags else None, bags_format=bags_format, overwrite=overwrite)
    with progress_bar(f"embed ({encoder})") as update:
        report = run_embed(cfg, progress=lambda done, total: update(completed=done, total=total))
    rate = report["computed"] / report["seconds"] if report["seconds"] > 0 else 0.0
    console.print(f"embeddings/{report['name']}: {report['n_tiles']} x {report['embed_dim']} in {dataset} "
                  f"({report['computed']} computed on {report['device']}, {rate:.1f} tiles/s)"
                  + (f"; {len(report['bags'])} bags in {bags}" if bags else ""), highlight=False, soft_wrap=True)
