"""``genpath convert graikos-ldm CKPT --config YAML --out DIR`` (registered on the ``genpath convert`` group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import console, user_errors


@user_errors
def graikos_ldm(
    src: Annotated[Path, typer.Argument(help="Their Lightning checkpoint: checkpoints/last.ckpt (read weights-only).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Their project YAML (configs/*-project.yaml; read "
                                         "with yaml.safe_load, nothing instantiated).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The genpath folder to write (new or empty).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing non-empty --out.")] = False,
) -> None:
    """Convert a Graikos et al. latent diffusion model (CVPR 2024; CompVis .ckpt + YAML) into a genpath synth folder.

    UNet -> diffusers UNet2DConditionModel, VQ-f4 first stage -> VQModel, the SSL-embedding Linear
    -> LinearEmbeddingProjector (null token = its bias), PLMS -> PNDMScheduler.

    Run the result with: genpath synth --model OUT --embeddings FILE.npy --steps 50 --guidance 2 --out DIR
    (--guidance = their unconditional_guidance_scale; 1 + g for their large-image loop's g).
    """
    from genpath.apps.convert_graikos import convert_graikos_ldm

    record = convert_graikos_ldm(src, config, out, overwrite=overwrite)
    unet, vq = record["unet"], record["first_stage"]
    f = 2 ** (len(vq["block_out_channels"]) - 1)
    dims = "+".join(str(d) for d in record["embed_dims"])
    console.print(f"converted {src.name} ({record['conditioner']} {dims} -> {record['tokens']} token(s), UNet "
                  f"{unet['block_out_channels']}, VQ-f{f} first stage, {record['tile_pixels']} px tiles"
                  f"{', EMA weights' if record['ema'] else ''}) to {out}; run: genpath synth --model {out} "
                  "--embeddings FILE.npy --steps 50 --guidance 2 --out DIR", highlight=False, soft_wrap=True)
