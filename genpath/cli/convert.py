"""``genpath convert FAMILY SRC --out DIR``: published weights -> a genpath folder (one command per family)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import console, user_errors
from genpath.cli.convert_graikos import graikos_ldm

#: Published families genpath reads without conversion (kept in step with the registries by a test).
LOADED_DIRECTLY = ("Loaded directly, no conversion: the encoders uni, uni2-h, virchow2, h-optimus-0, "
                   "h-optimus-1, phikon-v2 and conch-v1.5 (--encoder NAME:FILE, create_encoder(NAME, "
                   "checkpoint_path=FILE)); the official HistAug releases histaug-conch, -conch_v15, -uni, "
                   "-virchow2 and -hoptimus1 (augment.load_histaug(DIR), HistAugTransform(DIR)); PixCell-256, "
                   "PixCell-1024 and PixCell-256-Cell-ControlNet (genpath synth --model DIR --vae SD3.5_VAE).")

#: One line per family converted by a command below (the group's help lists them).
FAMILIES = (
    "pix2pix (pix2pix / CycleGAN ResnetGenerator, CUT, ASP and BCI generators -> a translator folder for "
    "'genpath translate')",
    "stainfuser (the published StainFuser checkpoint, SD-2.1-base UNet + ControlNet -> a StainFuserPipeline "
    "folder for 'genpath normalize --method stainfuser')",
    "graikos-ldm (Graikos et al. CVPR 2024 CompVis LDM .ckpt + project YAML, VQ-f4 -> an "
    "EmbeddingToImagePipeline folder for 'genpath synth')",
)

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Convert published weights into genpath folders (read weights-only, never downloaded). "
                       f"Families: {'; '.join(FAMILIES)}.", epilog=LOADED_DIRECTLY)

Out = Annotated[Path, typer.Option("--out", "-o", help="The genpath folder to write (new or empty).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty --out.")]


@app.command("pix2pix")
@user_errors
def pix2pix(
    src: Annotated[Path, typer.Argument(help="The generator checkpoint: latest_net_G.pth (or .safetensors).")],
    out: Out,
    preset: Annotated[str | None, typer.Option(help="bci (BCI PyramidPix2pix: resnet_9blocks, batch norm, "
                                               "dropout, batch statistics) or asp (ASP: resnet_6blocks, "
                                               "instance norm, anti-aliased, spectral norm).")] = None,
    n_blocks: Annotated[int | None, typer.Option("--n-blocks", help="Resnet blocks (9 or 6: --netG "
                                                 "resnet_9blocks/6blocks); default: read from the file.")] = None,
    ngf: Annotated[int | None, typer.Option(help="Stem width (--ngf, 64); default: read from the file.")] = None,
    norm: Annotated[str | None, typer.Option(help="batch, instance or none (--norm / --normG); default: read "
                                             "from the file.")] = None,
    dropout: Annotated[bool | None, typer.Option("--dropout/--no-dropout", help="Dropout layers in the blocks "
                                                 "(pix2pix/BCI without --no_dropout); default: read from the "
                                                 "file.")] = None,
    antialias: Annotated[bool | None, typer.Option("--antialias/--no-antialias", help="CUT's anti-aliased down- "
                                                   "and upsampling; default: read from the file.")] = None,
    spectral_norm: Annotated[bool | None, typer.Option("--spectral-norm/--no-spectral-norm", help="Spectral norm "
                                                       "on the convolutions (ASP --weight_norm spectral), folded "
                                                       "into plain weights; default: read from the file.")] = None,
    batch_stats: Annotated[bool | None, typer.Option("--batch-stats/--no-batch-stats", help="Batch norms use each "
                                                     "image's own statistics at inference (BCI's test.py runs "
                                                     "the generator in train mode); default: off, on with "
                                                     "--preset bci.")] = None,
    source_stain: Annotated[str, typer.Option(help="Stain of the inputs (recorded).")] = "H&E",
    target_stain: Annotated[str, typer.Option(help="Stain of the outputs (recorded), e.g. 'HER2 IHC'.")] = "IHC",
    overwrite: Overwrite = False,
) -> None:
    """Convert a pix2pix / CycleGAN / CUT / ASP / BCI ResnetGenerator (latest_net_G.pth) into a translator folder.

    The architecture is read from the file; each flag given (or set by --preset) is checked against it.

    Run the result with: genpath translate tiles|slides INPUTS --model OUT --out DIR
    """
    from genpath.apps.convert import Pix2PixConvertOptions, convert_pix2pix_checkpoint

    options = Pix2PixConvertOptions(preset=preset, ngf=ngf, n_blocks=n_blocks, norm=norm, dropout=dropout,
                                    antialias=antialias, spectral_norm=spectral_norm, batch_stats=batch_stats,
                                    source_stain=source_stain, target_stain=target_stain)
    record = convert_pix2pix_checkpoint(src, out, options, overwrite=overwrite)
    g = record["generator"]
    parts = [f"ngf {g['ngf']}", f"{g['n_blocks']} blocks", f"{g['norm']} norm",
             "dropout" if g["use_dropout"] else "", "anti-aliased" if g["antialias_down"] else "",
             "spectral norm folded" if record["layout"]["spectral_norm"] else "",
             "batch statistics" if g["batch_stats"] else ""]
    console.print(f"converted {src.name} (ResnetGenerator: {', '.join(p for p in parts if p)}) to {out}; "
                  f"run: genpath translate tiles INPUTS --model {out} --out OUT", highlight=False, soft_wrap=True)


@app.command("stainfuser")
@user_errors
def stainfuser(
    src: Annotated[Path, typer.Argument(help="The released checkpoint (.safetensors, or .pth read weights-only).")],
    out: Out,
    unet_config: Annotated[Path | None, typer.Option("--unet-config", help="UNet2DConditionModel JSON config "
                                                     "(default: SD-2.1-base, shipped); the ControlNet follows "
                                                     "it.")] = None,
    vae_config: Annotated[Path | None, typer.Option("--vae-config", help="AutoencoderKL JSON config (default: "
                                                    "SD-2.1-base, shipped).")] = None,
    scheduler_config: Annotated[Path | None, typer.Option("--scheduler-config", help="PNDMScheduler JSON config "
                                                          "(default: SD-2.1-base, shipped).")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Convert the published StainFuser checkpoint (encoder.* / conditioner.* / noise_predictor.*) into a folder.

    Every key must be used and every weight filled; missing or unexpected keys are listed.

    Run the result with: genpath normalize tiles|slides INPUTS --method stainfuser --model OUT --target T --out DIR
    """
    from genpath.apps.convert import convert_stainfuser_checkpoint

    record = convert_stainfuser_checkpoint(src, out, unet_config=unet_config, vae_config=vae_config,
                                           scheduler_config=scheduler_config, overwrite=overwrite)
    keys = ", ".join(f"{name} {n}" for name, n in record["keys"].items())
    console.print(f"converted {src.name} (StainFuser: {keys} tensors) to {out}; run: genpath normalize tiles "
                  f"INPUTS --method stainfuser --model {out} --target TARGET --out OUT", highlight=False,
                  soft_wrap=True)


app.command("graikos-ldm")(graikos_ldm)
