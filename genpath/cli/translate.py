"""``genpath translate tiles|slides``: H&E to IHC with a trained or converted translator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import LegacyDefaultGroup, progress_bar, report_failures, user_errors

app = typer.Typer(cls=LegacyDefaultGroup, no_args_is_help=True, add_completion=False,
                  help="Translate H&E tiles or whole slides to IHC with a trained translator.")

Inputs = Annotated[list[str], typer.Argument(help="H&E image files, folders, globs (slides: also CSV).")]
Model = Annotated[Path, typer.Option(help="A translator folder (genpath train translator).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (inputs are never modified).")]
Steps = Annotated[int, typer.Option(help="Diffusion steps (ignored by one-step generators).")]
Seed = Annotated[int, typer.Option(help="Seed of the diffusion translator's shared noise.")]
TileSize = Annotated[int, typer.Option(help="Slides: output tile size in pixels.")]
Overlap = Annotated[int, typer.Option(help="Slides: window overlap in pixels (feathered).")]
Level = Annotated[int, typer.Option(help="Slides: level to translate (0 = full resolution).")]
BatchSize = Annotated[int, typer.Option(help="Slides: windows per call.")]


def _translator(model: Path, steps: int, seed: int):  # noqa: ANN202 - a Translator
    from genpath.pipelines import Translator

    return Translator(model, num_inference_steps=steps, seed=seed)


@app.command("tiles")
@user_errors
def tiles(inputs: Inputs, model: Model, out: Out, steps: Steps = 4, seed: Seed = 0,
          output_format: Annotated[str, typer.Option("--format", help="png, jpg, tif or same.")] = "png",
          overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in OUT made with "
                                                  "another model or settings.")] = False) -> None:
    """Translate image tiles to OUT/<name>.<format>, with OUT/manifest.json (IHC-looking inputs get a warning)."""
    from genpath.apps.translate import TranslateOptions, translate_tiles
    from genpath.io.images import expand_inputs, plan_outputs
    from normalization.tiles import refuse_output_collisions

    TranslateOptions(steps, seed)
    refuse_output_collisions(plan_outputs(expand_inputs(inputs), out, output_format))  # before loading the model
    translator = _translator(model, steps, seed)
    with progress_bar("translate") as update:
        rows = translate_tiles(inputs, out, translator, output_format, on_done=lambda: update(advance=1),
                               overwrite=overwrite)
    failed = sum(r["status"] == "failed" for r in rows)
    report_failures(rows, f"tiles translated {len(rows) - failed}, failed {failed}; outputs and manifest.json in {out}")


@app.command("slides")
@user_errors
def slides(inputs: Inputs, model: Model, out: Out, steps: Steps = 4, seed: Seed = 0,
           output_format: Annotated[str, typer.Option("--format", help="tiff or ome-zarr.")] = "tiff",
           tile_size: TileSize = 512, overlap: Overlap = 32, level: Level = 0, batch_size: BatchSize = 8,
           overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo every slide; also replaces a previous "
                                                   "run in OUT made with another model or settings.")] = False
           ) -> None:
    """Translate whole slides to pyramidal OUT/<name>.tiff (or .ome.zarr), with OUT/manifest.csv."""
    from genpath.apps.translate import TranslateOptions, translate_slides

    if output_format not in ("tiff", "ome-zarr"):
        raise ValueError(f"format: expected 'tiff' or 'ome-zarr' for slides, got {output_format!r}")
    options = TranslateOptions(steps, seed, batch_size, output_format, tile_size, overlap, level)
    translator = _translator(model, steps, seed)
    with progress_bar("slides") as update:
        rows = translate_slides(inputs, out, translator, options, on_slide=lambda row: update(advance=1),
                                overwrite=overwrite)
    failed = sum(r["status"] == "failed" for r in rows)
    report_failures(rows, f"slides translated {len(rows) - failed}, failed {failed}; outputs and manifest.csv in {out}")


@app.command("auto", hidden=True)
@user_errors
def auto(inputs: Inputs, model: Model, out: Out, steps: Steps = 4, seed: Seed = 0,
         output_format: Annotated[str | None, typer.Option("--format", help="Tiles: png, jpg, tif, same; "
                                                           "slides: tiff or ome-zarr.")] = None,
         tile_size: TileSize = 512, overlap: Overlap = 32, level: Level = 0, batch_size: BatchSize = 8) -> None:
    """Run the old form: slides when any input is a slide, else tiles."""
    from genpath.cli.common import console
    from genpath.wsi import inputs_hold_slides

    console.print("note: 'genpath translate INPUTS' without 'tiles' or 'slides' is deprecated and will be removed "
                  "in genpath 0.3; use 'genpath translate tiles ...' or 'genpath translate slides ...'",
                  style="yellow", highlight=False)
    if output_format in ("tiff", "ome-zarr") or (output_format is None and inputs_hold_slides(inputs)):
        slides(inputs, model, out, steps, seed, output_format or "tiff", tile_size, overlap, level, batch_size)
    else:
        tiles(inputs, model, out, steps, seed, output_format or "png")
