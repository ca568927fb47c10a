"""``genpath normalize tiles|slides``: parse options, build a config, call :mod:`genpath.apps.normalize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from genpath.cli.common import LegacyDefaultGroup, console, progress_bar, progress_bars, report_failures, user_errors
from normalization.base import available_methods

_NOTICE = ("note: 'genpath normalize INPUTS' without 'tiles' or 'slides' is deprecated and will be removed in "
           "genpath 0.3; use 'genpath normalize tiles ...' or 'genpath normalize slides ...'")


app = typer.Typer(cls=LegacyDefaultGroup, no_args_is_help=True, add_completion=False,
                  help="Normalize image tiles or whole slides to a target stain.")

Inputs = Annotated[list[str], typer.Argument(help="Files, folders or glob patterns (slides: also CSV slide,mpp).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (inputs are never modified).")]
Method = Annotated[str | None, typer.Option(help=f"One of the registered methods: {', '.join(available_methods())}.")]
Model = Annotated[Path | None, typer.Option(help="stainfuser: a StainTransferPipeline folder or a StainFuserPipeline "
                                                 "folder (genpath convert stainfuser).")]
Target = Annotated[list[str] | None, typer.Option(help="Target image(s) to fit on.")]
State = Annotated[Path | None, typer.Option(help="A fitted normalizer (.safetensors).")]
Config = Annotated[Path | None, typer.Option(help="YAML run config (configs/normalize.yaml, normalize_slides.yaml).")]
SaveState = Annotated[Path | None, typer.Option(help="Save the fitted normalizer here (.safetensors, a new file).")]
BatchSize = Annotated[int | None, typer.Option(help="Tiles (tiles) or windows (slides) per call.")]
OnInvalid = Annotated[str | None, typer.Option(help="passthrough, reference or raise.")]
ColourAnchor = Annotated[str | None, typer.Option(
    help="stainfuser: reinhard (default for genpath's own models: pin each output tile's colour statistics "
         "to the target's) or none.")]
TileFormat = Annotated[str | None, typer.Option("--format", help="png, jpg, tif or same.")]
SlideFormat = Annotated[str | None, typer.Option("--format", help="tiff (pyramidal BigTIFF) or ome-zarr.")]
AnyFormat = Annotated[str | None, typer.Option("--format", help="Tiles: png, jpg, tif, same; slides: tiff, ome-zarr.")]
TileSize = Annotated[int | None, typer.Option(help="Output tile size in pixels.")]
Overlap = Annotated[int | None, typer.Option(help="Window overlap in pixels (feathered).")]
Level = Annotated[int | None, typer.Option(help="Level to normalize (0 = full resolution).")]
Mpp = Annotated[float | None, typer.Option(help="Microns per pixel when metadata lacks it.")]
Compression = Annotated[str | None, typer.Option(help="TIFF tiles: jpeg or zlib.")]
Resume = Annotated[bool | None, typer.Option("--resume/--overwrite",
                                             help="Skip slides done with the same config, or redo everything.")]
SkipErrors = Annotated[bool | None, typer.Option("--skip-errors/--fail-fast", help="Record a failed slide and go on.")]
Workers = Annotated[int | None, typer.Option(help="Slides processed in parallel.")]
Executor = Annotated[str | None, typer.Option(help="local or dask.")]
Scheduler = Annotated[str | None, typer.Option(help="Dask scheduler address (default: a local cluster).")]


@app.command("tiles")
@user_errors
def tiles(inputs: Inputs, out: Out, method: Method = None, model: Model = None, target: Target = None,
          state: State = None, config: Config = None, save_state: SaveState = None, batch_size: BatchSize = None,
          output_format: TileFormat = None, on_invalid: OnInvalid = None, colour_anchor: ColourAnchor = None,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in OUT made with "
                                                  "other settings (its outputs are removed first).")] = False) -> None:
    """Normalize image tiles (PNG/JPEG/TIFF) to OUT/<name>.<format>, with OUT/manifest.json and OUT/run.json."""
    from genpath.apps.normalize import resolve_normalize_config

    cfg = resolve_normalize_config(config, "tiles", method=method, model=model, target=target, state=state,
                                   batch_size=batch_size, output_format=output_format, on_invalid=on_invalid,
                                   colour_anchor=colour_anchor)
    _run_tiles(inputs, out, cfg, save_state, overwrite)


@app.command("slides")
@user_errors
def slides(inputs: Inputs, out: Out, method: Method = None, model: Model = None, target: Target = None,
           state: State = None, config: Config = None, save_state: SaveState = None, batch_size: BatchSize = None,
           output_format: SlideFormat = None, on_invalid: OnInvalid = None, tile_size: TileSize = None,
           overlap: Overlap = None, level: Level = None, mpp: Mpp = None, compression: Compression = None,
           resume: Resume = None, skip_errors: SkipErrors = None, workers: Workers = None,
           executor: Executor = None, scheduler: Scheduler = None, colour_anchor: ColourAnchor = None) -> None:
    """Normalize whole slides to pyramidal OUT/<name>.tiff or .ome.zarr, with manifest.csv, config.yaml, QC."""
    from genpath.apps.normalize import resolve_normalize_config

    cfg = resolve_normalize_config(
        config, "slides", method=method, model=model, target=target, state=state, batch_size=batch_size,
        output_format=output_format, on_invalid=on_invalid, tile_size=tile_size, overlap=overlap, level=level,
        mpp=mpp, compression=compression, resume=resume, skip_errors=skip_errors, workers=workers,
        executor=executor, scheduler=scheduler, colour_anchor=colour_anchor)
    _run_slides(inputs, out, cfg, save_state)


@app.command("auto", hidden=True)
@user_errors
def auto(inputs: Inputs, out: Out, method: Method = None, model: Model = None, target: Target = None,
         state: State = None, config: Config = None, save_state: SaveState = None, batch_size: BatchSize = None,
         output_format: AnyFormat = None, on_invalid: OnInvalid = None, tile_size: TileSize = None,
         overlap: Overlap = None, level: Level = None, mpp: Mpp = None, compression: Compression = None,
         resume: Resume = None, skip_errors: SkipErrors = None, workers: Workers = None,
         executor: Executor = None, scheduler: Scheduler = None) -> None:
    """Run the old form: slides when any input is a slide (or --format is tiff/ome-zarr), else tiles."""
    from genpath.apps.normalize import detect_mode, resolve_normalize_config

    console.print(_NOTICE, style="yellow", highlight=False)
    options: dict[str, Any] = dict(method=method, model=model, target=target, state=state, batch_size=batch_size,
                                   output_format=output_format, on_invalid=on_invalid)
    if detect_mode(inputs, output_format, config) == "tiles":
        _run_tiles(inputs, out, resolve_normalize_config(config, "tiles", **options), save_state, resume is False)
        return
    cfg = resolve_normalize_config(
        config, "slides", **options, tile_size=tile_size, overlap=overlap, level=level, mpp=mpp,
        compression=compression, resume=resume, skip_errors=skip_errors, workers=workers, executor=executor,
        scheduler=scheduler)
    _run_slides(inputs, out, cfg, save_state)


def _run_tiles(inputs: list[str], out: Path, cfg: Any, save_state: Path | None, overwrite: bool = False) -> None:
    from genpath.apps.normalize import run_normalize_tiles

    with progress_bar(f"normalize ({cfg.method})") as update:
        records = run_normalize_tiles(inputs, out, cfg, save_state, progress=lambda n: update(advance=n),
                                      overwrite=overwrite)
    failed = sum(r["status"] == "failed" for r in records)
    passed = sum(r["status"] == "passed_through" for r in records)
    report_failures(records, f"normalized {len(records) - failed - passed}, passed through (no usable tissue) "
                             f"{passed}, failed {failed}; outputs and manifest.json in {out}")


def _run_slides(inputs: list[str], out: Path, cfg: Any, save_state: Path | None) -> None:
    from genpath.apps.normalize import run_normalize_slides
    from genpath.wsi import expand_slides

    counts = {"done": 0, "failed": 0, "resumed": 0}
    total = len(expand_slides(inputs, out, cfg.slide_options().output_format))
    with progress_bars(f"slides ({cfg.method})", "tiles") as (update, tiles):
        update(total=total)

        def on_start(job: dict, index: int) -> None:
            tiles(description=f"tiles of {Path(job['input']).name}", completed=0, total=None)

        def on_slide(row: dict) -> None:
            counts["resumed" if row.get("resumed") else row["status"]] += 1
            update(advance=1)
            if row["status"] == "failed":
                console.print(f"[red]failed[/red] {escape(row['input'])}: {escape(row['error'])}", highlight=False)

        try:
            rows = run_normalize_slides(inputs, out, cfg, save_state, on_slide=on_slide, on_start=on_start,
                                        tile_progress=lambda done, count: tiles(completed=done, total=count))
        except RuntimeError as error:  # --fail-fast stopped the batch
            console.print(f"[red]stopped[/red]: {escape(str(error))}", highlight=False)
            raise typer.Exit(code=1) from error
    failed = sum(r["status"] == "failed" for r in rows)
    console.print(f"slides normalized {counts['done']}, already done (resumed) {counts['resumed']}, failed {failed}; "
                  f"outputs, manifest.csv and config.yaml in {out}", highlight=False)
    if failed:
        raise typer.Exit(code=1)
