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
    os.replace(tmp, path)


@app.command()
def normalize(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (inputs are never modified).")],
    method: Annotated[str | None, typer.Option(help="macenko, reinhard or vahadane.")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Target image(s) to fit on.")] = None,
    state: Annotated[Path | None, typer.Option(help="A fitted normalizer (.safetensors).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML run config (see configs/normalize.yaml).")] = None,
    save_state: Annotated[Path | None, typer.Option(help="Save the fitted normalizer here.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Tiles per batch.")] = None,
    output_format: Annotated[str | None, typer.Option("--format", help="png, jpg, tif or same.")] = None,
    on_invalid: Annotated[str | None, typer.Option(help="passthrough, reference or raise.")] = None,
) -> None:
    """Normalize image tiles to a target stain; writes OUT/<name>.<format> and OUT/manifest.json."""
    cfg = load_config(config, NormalizeConfig, section="normalize") if config else NormalizeConfig()
    overrides = {"method": method, "target": target, "state": str(state) if state else None,
                 "batch_size": batch_size, "output_format": output_format}
    cfg = NormalizeConfig(**{**cfg.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    if on_invalid is not None:
        cfg.options["on_invalid"] = on_invalid

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


def main() -> None:
    """Entry point of the ``genpath`` console script."""
    app()


if __name__ == "__main__":
    main()
