"""``genpath eval synth``: distribution metrics of generated tiles against real ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from genpath.cli.common import user_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluate generated data.")


@app.command("synth")
@user_errors
def eval_synth(
    real: Annotated[Path, typer.Option(help="Folder of real tiles (held out from training).")],
    fake: Annotated[Path, typer.Option(help="Folder of generated tiles, or a synth output with images.zarr.")],
    out: Annotated[Path, typer.Option(help="JSON report path.")] = Path("out/eval_synth.json"),
    encoder: Annotated[list[str] | None, typer.Option(help="Registered encoder(s); default inception.fid.")] = None,
    encoder_path: Annotated[Path | None, typer.Option(help="path= for a genpath-small encoder.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many tiles per side.")] = None,
) -> None:
    """Print FD and KID of generated tiles against real tiles (per encoder) and write JSON."""
    from genpath.metrics.evaluate import evaluate_synthetic, write_report

    names = encoder or ["inception.fid"]
    kwargs = {n: {"path": str(encoder_path)} for n in names if n.startswith("genpath-small") and encoder_path}
    try:
        report = evaluate_synthetic(real, fake, names, kwargs, limit)
    except KeyError as error:
        raise ValueError(f"encoder: expected a registered encoder, got {error}") from None
    write_report(report, out)
    table = Table(title=f"{report['n_fake']} generated vs {report['n_real']} real tiles")
    for column in ("encoder", "FD", "KID", "KID std"):
        table.add_column(column)
    for name, m in report["metrics"].items():
        table.add_row(name, f"{m['fd']:.3f}", f"{m['kid']:.5f}", f"{m['kid_std']:.5f}")
    Console().print(table)
