"""``genpath synth``, ``synth-merge``, ``synth-large``: synthetic datasets and large images from trained pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from genpath.cli.common import console, progress_bar, report_failures, user_errors

#: ``--vae`` and ``--encoder`` of synth and synth-large.
Vae = Annotated[Path | None, typer.Option(help="PixCell: the SD3.5 VAE folder (the vae/ subfolder of "
                                               "stabilityai/stable-diffusion-3.5-large), which PixCell's folders do "
                                               "not include.")]
Encoder = Annotated[str | None, typer.Option(help="Encoder for reference/style images, NAME[:WEIGHTS] (PixCell: "
                                                  "uni2-h:PATH/pytorch_model.bin); default: the model folder's "
                                                  "encoder.json.")]


def _report(rows: list[dict], what: str, inputs: tuple[str, ...]) -> None:
    """Print the summary and each failed input (an unreadable image or mask file); exit 1 when any failed."""
    failed = [{"status": "failed", "input": next((r[k] for k in inputs if r.get(k)), ""), "error": r.get("error")}
              for r in rows if r.get("status") == "failed"]
    report_failures(failed, f"{len(rows) - len(failed)} {what}" + (f"; {len(failed)} inputs failed" if failed else ""))


@user_errors
def synth(
    model: Annotated[Path, typer.Option(help="EmbeddingToImagePipeline or PixCell folder (with --masks: a "
                                             "MaskToImagePipeline or PixCell ControlNet folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    from_images: Annotated[list[str] | None, typer.Option(help="Real images to make variations of.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Conditions as an (N,D) .npy file.")] = None,
    n_per_condition: Annotated[int, typer.Option(help="Samples per condition (at most 10 million samples in "
                                                      "all).")] = 4,
    output_format: Annotated[str, typer.Option("--format", help="zarr or png.")] = "zarr",
    seed: Annotated[int, typer.Option(help="Base seed; sample i uses seed + i.")] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")] = 2.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    batch_size: Annotated[int, typer.Option(help="Samples per pipeline call (1..1024).")] = 8,
    masks: Annotated[Path | None, typer.Option(help="Nuclei masks (.npz, label image or folder): "
                                                    "needs a MaskToImagePipeline --model.")] = None,
    style_from: Annotated[list[str] | None, typer.Option(help="--masks: images whose embeddings set style.")] = None,
    controlnet_scale: Annotated[float, typer.Option(help="--masks: weight of the mask (0 ignores it).")] = 1.0,
    tile: Annotated[int | None, typer.Option(help="--masks: cut larger masks into tiles of this size (a multiple "
                                                  "of the VAE factor).")] = None,
    base: Annotated[Path | None, typer.Option(help="--masks: the base EmbeddingToImagePipeline of a ControlNet "
                                                   "folder (checked against its base.json fingerprint).")] = None,
    vae: Vae = None,
    encoder: Encoder = None,
    trust_model_code: Annotated[bool, typer.Option(help="Let the model folder's encoder.json name a TorchScript "
                                                        "encoder, which runs code from that folder. Only for "
                                                        "folders you trust.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out that holds a run with other settings: "
                                                 "first delete that run's outputs (images/, masks/, *.zarr, "
                                                 "manifest.csv, embeddings.npy, run.json), nothing else.")] = False,
    shard: Annotated[str | None, typer.Option(help="Generate only part I of N (0-based, I/N with 0 <= I < N), in "
                                                   "whole batches; merge the parts with genpath synth-merge.")] = None,
    executor: Annotated[str, typer.Option(help="local, or dask: run --workers shards as dask tasks and merge "
                                               "them into --out.")] = "local",
    workers: Annotated[int, typer.Option(help="--executor dask: number of shards and local worker "
                                              "processes.")] = 1,
    scheduler: Annotated[str | None, typer.Option(help="--executor dask: scheduler address (default: a local "
                                                       "cluster; --out must be on a shared disk).")] = None,
) -> None:
    """Generate a synthetic dataset (images, embeddings, manifest.csv); an interrupted run resumes.

    OUT/run.json records the settings; a rerun with other settings into the same --out is
    refused unless --overwrite. An unreadable reference/style image or mask file (in a
    folder) is a failed row of manifest.csv, the rest is generated, and the exit code is 1.

    With ``--masks``: (image, mask) pairs from a MaskToImagePipeline, one or more per mask
    (``--n-per-condition``), to OUT/pairs.zarr or OUT/images + OUT/masks.

    Published PixCell folders (PixCell-256, PixCell-1024, PixCell-256-Cell-ControlNet) run with
    ``--vae`` (the SD3.5 VAE) and UNI2-h conditions: ``--embeddings`` ((N,1536), or (N,16,1536)
    for PixCell-1024) or ``--from-images`` / ``--style-from`` with ``--encoder uni2-h:PATH``.

    At scale: ``--shard I/N`` writes part I of N (same per-sample seeds, so the merged shards
    equal an unsharded run), ``genpath synth-merge`` merges them; ``--executor dask --workers N``
    does both on a dask cluster.
    """
    scale = {"shard": shard, "executor": executor, "workers": workers, "scheduler": scheduler,
             "vae": str(vae) if vae else None, "encoder": encoder}
    if masks is not None:
        from genpath.synth_masks import MaskSynthConfig, run_mask_synth

        cfg = MaskSynthConfig(model=str(model), out=str(out), masks=str(masks), style_from=list(style_from or []),
                              n_per_mask=n_per_condition, output_format=output_format, seed=seed,
                              controlnet_scale=controlnet_scale, guidance=guidance, steps=steps,
                              batch_size=batch_size, tile=tile, overwrite=overwrite,
                              base=str(base) if base else None, trust_model_code=trust_model_code, **scale)
        with progress_bar("synth (masks)") as update:
            rows = run_mask_synth(cfg, progress=lambda done, total: update(completed=done, total=total))
        _report(rows, f"(image, mask) pairs and manifest.csv in {out}", ("mask_source", "style"))
        return
    from genpath.synth import SynthConfig, run_synth

    cfg = SynthConfig(model=str(model), out=str(out), from_images=list(from_images or []),
                      embeddings=str(embeddings) if embeddings else None, n_per_condition=n_per_condition,
                      output_format=output_format, seed=seed, guidance=guidance, steps=steps, batch_size=batch_size,
                      overwrite=overwrite, trust_model_code=trust_model_code, **scale)
    with progress_bar("synth") as update:
        rows = run_synth(cfg, progress=lambda done, total: update(completed=done, total=total))
    _report(rows, f"samples, manifest.csv and embeddings.npy in {out}", ("source",))


@user_errors
def synth_merge(
    shards: Annotated[list[Path], typer.Argument(help="Every shard folder of one run (genpath synth --shard I/N).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder of the merged run.")],
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out that holds a run with other settings "
                                                 "(deletes that run's outputs only).")] = False,
) -> None:
    """Merge the finished shards of one synth run into what an unsharded run writes to OUT.

    Each shard must be given once and all of them; their run.json must agree on everything but
    the shard. Rows keep the unsharded order; failed inputs are reported (exit 1) as by synth.
    """
    from genpath.synth_shards import merge_shards

    rows = merge_shards(shards, out, overwrite=overwrite)
    _report(rows, f"samples merged from {len(shards)} shards into {out}", ("source", "mask_source", "style"))


@user_errors
def synth_large(
    model: Annotated[Path, typer.Option(help="EmbeddingToImagePipeline or PixCell folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG (a new file or a previous synth-large "
                                                          "result; its .json beside it).")],
    from_region: Annotated[Path | None, typer.Option(help="A real image whose tile embeddings lay out the "
                                                          "result.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="An embedding grid (gh, gw, D) as .npy.")] = None,
    mode: Annotated[str, typer.Option(help="shifted (1.0x cost) or overlap (MultiDiffusion).")] = "shifted",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 2.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    trust_model_code: Annotated[bool, typer.Option(help="Let the model folder's encoder.json name a TorchScript "
                                                        "encoder (runs code; trusted folders only).")] = False,
    vae: Vae = None,
    encoder: Encoder = None,
) -> None:
    """Assemble a large image from a grid of embeddings (a real region's, or given); writes PNG + JSON.

    PixCell: ``--vae`` (the SD3.5 VAE); the grid holds one UNI2-h embedding per 256-px cell
    (``--from-region`` with ``--encoder uni2-h:PATH``), for PixCell-256 and PixCell-1024 alike.
    """
    from genpath.apps.synth_large import synth_large_image

    report = synth_large_image(model, out, from_region=from_region, embeddings=embeddings, mode=mode, seed=seed,
                               guidance=guidance, steps=steps, trust_model_code=trust_model_code, vae=vae,
                               encoder=encoder)
    console.print(f"wrote {out}: {report}", highlight=False)
