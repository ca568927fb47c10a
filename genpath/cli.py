"""The ``genpath`` command line."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from genpath.config import NormalizeConfig, load_config
from genpath.io.images import expand_inputs, read_image, write_image

app = typer.Typer(add_completion=False, no_args_is_help=True, help="genpath: stain normalization and augmentation.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Run the generative stain and augmentation engine for computational pathology."""


def _output_path(out: Path, relative: Path, output_format: str) -> Path:
    suffix = relative.suffix if output_format == "same" else f".{output_format}"
    return out / relative.with_suffix(suffix)


def _write_manifest(path: Path, records: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(records, handle, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@app.command()
def normalize(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (inputs are never modified).")],
    method: Annotated[str | None, typer.Option(help="macenko, reinhard, vahadane or stainfuser.")] = None,
    model: Annotated[Path | None, typer.Option(help="stainfuser: a StainTransferPipeline folder.")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Target image(s) to fit on.")] = None,
    state: Annotated[Path | None, typer.Option(help="A fitted normalizer (.safetensors).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML run config (see configs/normalize.yaml).")] = None,
    save_state: Annotated[Path | None, typer.Option(help="Save the fitted normalizer here.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tiles per batch.")] = None,
    output_format: Annotated[str | None, typer.Option("--format", help="png, jpg, tif or same.")] = None,
    on_invalid: Annotated[str | None, typer.Option(help="passthrough, reference or raise.")] = None,
    tile_size: Annotated[int | None, typer.Option(help="Slides: output tile size in pixels.")] = None,
    overlap: Annotated[int | None, typer.Option(help="Slides: window overlap in pixels (feathered).")] = None,
    level: Annotated[int | None, typer.Option(help="Slides: level to normalize (0 = full resolution).")] = None,
    mpp: Annotated[float | None, typer.Option(help="Slides: microns per pixel when metadata lacks it.")] = None,
    compression: Annotated[str | None, typer.Option(help="Slides (tiff): jpeg or zlib.")] = None,
    resume: Annotated[bool | None, typer.Option("--resume/--overwrite",
                                                help="Slides: skip slides done with the same config, "
                                                     "or redo everything.")] = None,
    skip_errors: Annotated[bool | None, typer.Option("--skip-errors/--fail-fast",
                                                     help="Slides: record a failed slide and go on.")] = None,
    workers: Annotated[int | None, typer.Option(help="Slides processed in parallel.")] = None,
    executor: Annotated[str | None, typer.Option(help="Slides: local or dask.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler address (default: a local cluster).")] = None,
) -> None:
    """Normalize image tiles or whole slides to a target stain.

    Tiles (PNG/JPEG/TIFF images) go to OUT/<name>.<format> with OUT/manifest.json. Slides
    (SVS, NDPI, MRXS, pyramidal TIFF, OME-TIFF, DICOM, ..., a folder, a glob, or a CSV with
    ``slide,mpp`` columns) go to pyramidal OUT/<name>.tiff or OUT/<name>.ome.zarr with
    OUT/manifest.csv, OUT/config.yaml and OUT/<name>.<ext>.qc/ images.
    """
    cfg = load_config(config, NormalizeConfig, section="normalize") if config else NormalizeConfig()
    overrides = {"method": method, "target": target, "state": str(state) if state else None,
                 "batch_size": batch_size, "output_format": output_format, "mpp": mpp, "resume": resume,
                 "skip_errors": skip_errors, "workers": workers, "executor": executor, "scheduler": scheduler}
    slide_overrides = {"tile_size": tile_size, "overlap": overlap, "level": level, "compression": compression}
    merged = {**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
    merged["slide"] = {**cfg.slide, **{k: v for k, v in slide_overrides.items() if v is not None}}
    merged["options"] = dict(cfg.options)
    if on_invalid is not None:
        merged["options"]["on_invalid"] = on_invalid
    if model is not None:
        merged["options"]["model"] = str(model)
    if merged["method"] == "stainfuser" and overlap is None and not cfg.slide.get("overlap"):
        merged["slide"]["overlap"] = 32  # a tile-wise model: feather-blend overlapping windows
    try:
        cfg = NormalizeConfig(**merged)
        if cfg.output_format is None:
            cfg.output_format = "tiff" if _wants_slides(inputs) else "png"
            cfg.__post_init__()
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    if not (cfg.state or cfg.target):
        raise typer.BadParameter("expected --target FILE or --state FILE, got neither", param_hint="--target")
    if cfg.slide_mode:
        _normalize_slides(inputs, out, cfg, save_state)
        return

    from normalization import StainNormalizer, build_normalizer

    if cfg.state:
        normalizer = StainNormalizer.load(cfg.state, **cfg.options)
    elif cfg.target:
        normalizer = build_normalizer(cfg.method, **cfg.options)
        targets = [read_image(p) for p, _ in expand_inputs(cfg.target)]
        normalizer.fit(targets)
    else:
        raise typer.BadParameter("expected --target FILE or --state FILE, got neither", param_hint="--target")
    normalizer = normalizer.to(cfg.device)
    if save_state:
        normalizer.save(save_state)

    files = expand_inputs(inputs)
    resolved_inputs = {p.resolve() for p, _ in files}
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"normalize ({normalizer.method})", total=len(files))
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start : start + cfg.batch_size]
            groups: dict[tuple[int, ...], list[tuple[Path, Path, torch.Tensor]]] = {}
            for path, relative in chunk:
                destination = _output_path(out, relative, cfg.output_format)
                try:
                    if destination.resolve() in resolved_inputs:
                        raise ValueError(f"out: writing {destination} would overwrite an input")
                    image = read_image(path)
                    groups.setdefault(tuple(image.shape), []).append((path, destination, image))
                except Exception as error:  # noqa: BLE001 - one bad file must not stop the batch
                    records.append({"input": str(path), "status": "failed", "error": str(error)})
                    progress.advance(task)
            for items in groups.values():
                batch = torch.stack([image for _, _, image in items]).to(cfg.device)
                try:
                    result, valid = normalizer(batch, return_valid=True)
                except Exception as error:  # noqa: BLE001 - report and go on with the next group
                    records.extend({"input": str(p), "status": "failed", "error": str(error)} for p, _, _ in items)
                    progress.advance(task, len(items))
                    continue
                for (path, destination, _), image, ok in zip(items, result.cpu(), valid.tolist(), strict=True):
                    try:
                        write_image(image, destination)
                        records.append({"input": str(path), "output": str(destination),
                                        "status": "normalized" if ok else "passed_through"})
                    except Exception as error:  # noqa: BLE001
                        records.append({"input": str(path), "status": "failed", "error": str(error)})
                    progress.advance(task)
    _write_manifest(out / "manifest.json", records)
    failed = [r for r in records if r["status"] == "failed"]
    passed = sum(r["status"] == "passed_through" for r in records)
    console.print(
        f"normalized {len(records) - len(failed) - passed}, passed through (no usable tissue) {passed}, "
        f"failed {len(failed)}; outputs and manifest.json in {out}"
    )
    for record in failed:
        console.print(f"[red]failed[/red] {record['input']}: {record['error']}")
    if failed:
        raise typer.Exit(code=1)


@app.command()
def translate(
    inputs: Annotated[list[str], typer.Argument(help="H&E image files, folders, globs, or slides.")],
    model: Annotated[Path, typer.Option(help="A translator folder (genpath train translator).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (inputs are never modified).")],
    steps: Annotated[int, typer.Option(help="Diffusion steps (ignored by one-step generators).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the diffusion translator's shared noise.")] = 0,
    output_format: Annotated[str | None, typer.Option("--format", help="Tiles: png, jpg, tif, same; "
                                                      "slides: tiff or ome-zarr.")] = None,
    tile_size: Annotated[int, typer.Option(help="Slides: output tile size in pixels.")] = 512,
    overlap: Annotated[int, typer.Option(help="Slides: window overlap in pixels (feathered).")] = 32,
    level: Annotated[int, typer.Option(help="Slides: level to translate (0 = full resolution).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Slides: windows per call.")] = 8,
) -> None:
    """Translate H&E tiles or whole slides to IHC with a trained translator.

    Tiles go to OUT/<name>.<format> with OUT/manifest.json; slides to pyramidal OUT/<name>.tiff
    (or .ome.zarr) with OUT/manifest.csv. Inputs that look like IHC already get a warning.
    """
    from genpath.translate import TranslateOptions, translate_slides, translate_tiles
    from genpath.translation.translator import Translator

    try:
        options = TranslateOptions(steps, seed, batch_size, output_format, tile_size, overlap, level)
        translator = Translator(model, num_inference_steps=steps, seed=seed)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="--model") from error
    if _wants_slides(inputs):
        rows = translate_slides(inputs, out, translator, options)
        summary, manifest = "slides translated", "manifest.csv"
    else:
        try:
            files = expand_inputs(inputs)
        except FileNotFoundError as error:
            raise typer.BadParameter(str(error), param_hint="INPUTS") from error
        rows = translate_tiles(files, out, translator, output_format or "png")
        summary, manifest = "tiles translated", "manifest.json"
    failed = [r for r in rows if r["status"] == "failed"]
    console.print(f"{summary} {len(rows) - len(failed)}, failed {len(failed)}; outputs and {manifest} in {out}")
    for row in failed:
        console.print(f"[red]failed[/red] {row['input']}: {row['error']}")
    if failed:
        raise typer.Exit(code=1)


train_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train genpath models (accelerate).")
app.add_typer(train_app, name="train")
TRAINERS = {  # kind -> (trainer "module:function", example config, what it trains)
    "encoder": ("genpath.training.encoder:train_encoder", "configs/encoder_small.yaml",
                "Train genpath's small SSL encoder (SimCLR with stain augmentations)."),
    "vae": ("genpath.training.vae:train_vae", "configs/vae_small.yaml",
            "Train the histology VAE (diffusers AutoencoderKL)."),
    "ldm": ("genpath.training.ldm:train_ldm", "configs/ldm_small.yaml",
            "Train the embedding-conditioned latent diffusion model (saves an EmbeddingToImagePipeline)."),
    "histaug": ("genpath.training.histaug:train_histaug", "configs/histaug_small.yaml",
                "Train HistAug (feature-space augmentation) for a frozen registered encoder."),
    "stainfuser": ("genpath.training.stainfuser:train_stainfuser", "configs/stainfuser_small.yaml",
                   "Train the diffusion stain normalizer on restaining-simulator triplets."),
    "controlnet": ("genpath.training.controlnet:train_controlnet", "configs/controlnet_hgsc.yaml",
                   "Train the nuclei-mask ControlNet on a frozen LDM (saves a MaskToImagePipeline)."),
    "translator": ("genpath.training.translator:train_translator", "configs/translator_bci_gan.yaml",
                   "Train an H&E->IHC translator on registered pairs (options.kind: gan or diffusion)."),
}


def _add_train_command(kind: str, example: str, summary: str) -> None:
    """Register ``genpath train <kind>``: one command per trainer, all with the same options."""

    def command(config: Path, max_steps: int | None = None, output_dir: Path | None = None) -> None:
        _run_trainer(kind, config, max_steps, output_dir)

    # real objects, not strings: the module's postponed annotations could not see ``kind`` here
    command.__annotations__ = {
        "config": Annotated[Path, typer.Option(help=f"YAML with a '{kind}' section ({example}).")],
        "max_steps": Annotated[int | None, typer.Option(help="Override train.max_steps.")],
        "output_dir": Annotated[Path | None, typer.Option(help="Override train.output_dir.")],
        "return": None,
    }
    command.__doc__ = f"{summary} Resumes from the last checkpoint in train.output_dir."
    train_app.command(kind)(command)


for _kind, (_, _example, _summary) in TRAINERS.items():
    _add_train_command(_kind, _example, _summary)


@app.command()
def synth(
    model: Annotated[Path, typer.Option(help="EmbeddingToImagePipeline folder (e.g. out/train/ldm_small/pipeline).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    from_images: Annotated[list[str] | None, typer.Option(help="Real images to make variations of.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="Conditions as an (N,D) .npy file.")] = None,
    n_per_condition: Annotated[int, typer.Option(help="Samples per condition.")] = 4,
    output_format: Annotated[str, typer.Option("--format", help="zarr or png.")] = "zarr",
    seed: Annotated[int, typer.Option(help="Base seed; sample i uses seed + i.")] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off).")] = 2.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
    batch_size: Annotated[int, typer.Option(help="Samples per pipeline call.")] = 8,
    masks: Annotated[Path | None, typer.Option(help="Nuclei masks (.npz, label image or folder): "
                                                     "needs a MaskToImagePipeline --model.")] = None,
    style_from: Annotated[list[str] | None, typer.Option(help="--masks: images whose embeddings set style.")] = None,
    controlnet_scale: Annotated[float, typer.Option(help="--masks: weight of the mask (0 ignores it).")] = 1.0,
    tile: Annotated[int | None, typer.Option(help="--masks: cut larger masks into tiles of this size.")] = None,
) -> None:
    """Generate a synthetic dataset (images, embeddings, manifest.csv); an interrupted run resumes.

    With ``--masks``: (image, mask) pairs from a MaskToImagePipeline, one or more per mask
    (``--n-per-condition``), to OUT/pairs.zarr or OUT/images + OUT/masks.
    """
    from genpath.synth import SynthConfig, run_synth

    if masks is not None:
        _synth_from_masks(model, out, masks, style_from or [], n_per_condition, output_format, seed,
                          controlnet_scale, guidance, steps, batch_size, tile)
        return
    try:
        cfg = SynthConfig(model=str(model), out=str(out), from_images=list(from_images or []),
                          embeddings=str(embeddings) if embeddings else None, n_per_condition=n_per_condition,
                          output_format=output_format, seed=seed, guidance=guidance, steps=steps,
                          batch_size=batch_size)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("synth", total=None)
        try:
            rows = run_synth(cfg, progress=lambda done, total: progress.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError) as error:
            raise typer.BadParameter(str(error)) from error
    console.print(f"{len(rows)} samples, manifest.csv and embeddings.npy in {out}")


def _synth_from_masks(model: Path, out: Path, masks: Path, style_from: list[str], n: int, output_format: str,
                      seed: int, scale: float, guidance: float, steps: int, batch_size: int, tile: int | None) -> None:
    from genpath.synth_masks import MaskSynthConfig, run_mask_synth

    try:
        cfg = MaskSynthConfig(model=str(model), out=str(out), masks=str(masks), style_from=style_from, n_per_mask=n,
                              output_format=output_format, seed=seed, controlnet_scale=scale, guidance=guidance,
                              steps=steps, batch_size=batch_size, tile=tile)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("synth (masks)", total=None)
        try:
            rows = run_mask_synth(cfg, progress=lambda done, total: progress.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError) as error:
            raise typer.BadParameter(str(error)) from error
    console.print(f"{len(rows)} (image, mask) pairs and manifest.csv in {out}")


@app.command("synth-large")
def synth_large(
    model: Annotated[Path, typer.Option(help="EmbeddingToImagePipeline folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output PNG.")],
    from_region: Annotated[Path | None, typer.Option(help="A real image whose tile embeddings lay out the result.")] = (
        None
    ),
    embeddings: Annotated[Path | None, typer.Option(help="An embedding grid (gh, gw, D) as .npy.")] = None,
    mode: Annotated[str, typer.Option(help="shifted (1.0x cost) or overlap (MultiDiffusion).")] = "shifted",
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 2.0,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 25,
) -> None:
    """Assemble a large image from a grid of embeddings (a real region's, or given); writes PNG + JSON."""
    import json

    import numpy as np

    from genpath.io.images import read_image, write_image
    from genpath.pipelines.large_image import generate_large_image, seam_score
    from genpath.synth import load_pipeline, pipeline_encoder

    if (from_region is None) == (embeddings is None):
        raise typer.BadParameter("expected exactly one of --from-region or --embeddings")
    try:
        pipe = load_pipeline(model)
        tile = pipe.unet.config.sample_size * pipe.vae_scale_factor
        if embeddings is not None:
            grid = torch.as_tensor(np.load(embeddings), dtype=torch.float32)
        else:
            image = read_image(from_region)
            gh, gw = image.shape[1] // tile, image.shape[2] // tile
            if gh == 0 or gw == 0:
                raise ValueError(f"from_region: expected an image of at least {tile}px, got {tuple(image.shape[1:])}")
            tiles = image[:, : gh * tile, : gw * tile].unfold(1, tile, tile).unfold(2, tile, tile)
            tiles = tiles.permute(1, 2, 0, 3, 4).reshape(gh * gw, 3, tile, tile)
            with torch.no_grad():
                grid = pipeline_encoder(model)(tiles).reshape(gh, gw, -1)
        result = generate_large_image(pipe, grid, steps, guidance, torch.Generator().manual_seed(seed), mode=mode)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    write_image(result.images[0], out)
    report = {"size": list(result.images.shape[-2:]), "grid": list(grid.shape[:2]), "mode": mode,
              "cost_ratio": result.cost_ratio, "unet_calls": result.unet_calls,
              "seam_score": seam_score(result.images, tile), "seed": seed, "steps": steps, "guidance": guidance}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    console.print(f"wrote {out}: {report}")


eval_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluate generated data.")
app.add_typer(eval_app, name="eval")


@eval_app.command("synth")
def eval_synth(
    real: Annotated[Path, typer.Option(help="Folder of real tiles (held out from training).")],
    fake: Annotated[Path, typer.Option(help="Folder of generated tiles, or a synth output with images.zarr.")],
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("out/eval_synth.json"),
    encoder: Annotated[list[str] | None, typer.Option(help="Registered encoder(s); default inception.fid.")] = None,
    encoder_path: Annotated[Path | None, typer.Option(help="path= for a genpath-small encoder.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many tiles per side.")] = None,
) -> None:
    """Print FD and KID of generated tiles against real tiles (per encoder) and write JSON."""
    from rich.table import Table

    from genpath.metrics.evaluate import evaluate_synthetic, write_report

    names = encoder or ["inception.fid"]
    kwargs = {n: {"path": str(encoder_path)} for n in names if n.startswith("genpath-small") and encoder_path}
    try:
        report = evaluate_synthetic(real, fake, names, kwargs, limit)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise typer.BadParameter(str(error)) from error
    write_report(report, out)
    table = Table(title=f"{report['n_fake']} generated vs {report['n_real']} real tiles")
    for column in ("encoder", "FD", "KID", "KID std"):
        table.add_column(column)
    for name, m in report["metrics"].items():
        table.add_row(name, f"{m['fd']:.3f}", f"{m['kid']:.5f}", f"{m['kid_std']:.5f}")
    Console().print(table)


def _run_trainer(kind: str, config: Path, max_steps: int | None, output_dir: Path | None) -> None:
    import importlib

    from genpath.training.configs import load_train_config

    try:
        cfg = load_train_config(str(config), kind)
        if max_steps is not None:
            cfg.train.max_steps = max_steps
        if output_dir is not None:
            cfg.train.output_dir = str(output_dir)
        cfg.train.__post_init__()
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    module, name = TRAINERS[kind][0].split(":")
    final = getattr(importlib.import_module(module), name)(cfg)
    console.print(f"{kind}: saved {final} (log: {Path(cfg.train.output_dir) / 'log.jsonl'})")


def _wants_slides(inputs: list[str]) -> bool:
    """Whether the inputs hold slides (then slide mode) rather than image tiles."""
    import glob

    from genpath.io.slide import PLAIN_SUFFIXES, SLIDE_SUFFIXES
    from normalization.batch import is_slide_input

    for item in inputs:
        path = Path(item)
        if path.is_dir() and not path.name.lower().endswith(".zarr"):
            candidates = [p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES + PLAIN_SUFFIXES]
        elif path.exists():
            candidates = [path]
        else:
            candidates = [Path(m) for m in glob.glob(item, recursive=True)]
        if any(is_slide_input(p) for p in candidates if p.suffix.lower() not in PLAIN_SUFFIXES):
            return True
    return False


def _normalize_slides(inputs: list[str], out: Path, cfg: NormalizeConfig, save_state: Path | None) -> None:
    from normalization.batch import _normalizer_for, config_hash, run_batch

    try:
        key = config_hash(cfg)
        if save_state:
            _normalizer_for(cfg, key).save(save_state)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    counts = {"done": 0, "failed": 0, "resumed": 0}
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        slides = progress.add_task(f"slides ({cfg.method})", total=None)
        tiles = progress.add_task("tiles", total=None, visible=False)

        def on_start(job: dict, index: int) -> None:
            progress.update(tiles, description=f"tiles of {Path(job['input']).name}", completed=0, total=None,
                            visible=True)

        def on_tiles(done: int, total: int) -> None:
            progress.update(tiles, completed=done, total=total)

        def on_slide(row: dict) -> None:
            counts["resumed" if row.get("resumed") else row["status"]] += 1
            progress.advance(slides)
            if row["status"] == "failed":
                console.print(f"[red]failed[/red] {row['input']}: {row['error']}")

        try:
            from normalization.batch import expand_slides

            total = len(expand_slides(inputs, out, cfg.output_format or "tiff"))
            progress.update(slides, total=total)
            rows = run_batch(inputs, out, cfg, overwrite=cfg.resume is False, on_slide=on_slide, on_start=on_start,
                             tile_progress=on_tiles)
        except FileNotFoundError as error:
            raise typer.BadParameter(str(error), param_hint="INPUTS") from error
        except RuntimeError as error:
            console.print(f"[red]stopped[/red]: {error}")
            raise typer.Exit(code=1) from error
    failed = sum(r["status"] == "failed" for r in rows)
    console.print(
        f"slides normalized {counts['done']}, already done (resumed) {counts['resumed']}, failed {failed}; "
        f"outputs, manifest.csv and config.yaml in {out}"
    )
    if failed:
        raise typer.Exit(code=1)


def main() -> None:
    """Entry point of the ``genpath`` console script."""
    app()


if __name__ == "__main__":
    main()
