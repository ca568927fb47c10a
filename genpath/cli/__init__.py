"""The ``genpath`` command line: one module per command group, each a thin layer over a library call.

Commands parse options, build a typed config and call one function of :mod:`genpath.apps`,
:mod:`normalization`, :mod:`genpath.synth` or :mod:`genpath.training` that a Python user can
call the same way. Bad arguments and configs end in one line (``error: ...``, exit code 2);
a batch with failed items exits with code 1 after writing the rest.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from genpath import __version__
from genpath.cli import common, normalize, synth, train, translate
from genpath.cli import convert as convert_commands
from genpath.cli import datasets as dataset_commands
from genpath.cli import eval as eval_commands
from genpath.cli import preview as preview_commands
from genpath.utils.logging import set_verbosity

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="genpath: stain normalization, augmentation and synthesis for computational pathology.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genpath {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what genpath does (INFO).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Run the generative stain and augmentation engine for computational pathology."""
    set_verbosity(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    common.DEBUG["on"] = debug


app.add_typer(normalize.app, name="normalize")
app.add_typer(translate.app, name="translate")
app.add_typer(convert_commands.app, name="convert")
app.command("train", no_args_is_help=True)(train.train)
app.command("synth", no_args_is_help=True)(synth.synth)
app.command("synth-merge", no_args_is_help=True)(synth.synth_merge)
app.command("synth-large", no_args_is_help=True)(synth.synth_large)
app.add_typer(eval_commands.app, name="eval")
app.add_typer(preview_commands.app, name="preview")
app.command("tiles", no_args_is_help=True)(dataset_commands.tiles)
app.command("embed", no_args_is_help=True)(dataset_commands.embed)


def main() -> None:
    """Entry point of the ``genpath`` console script."""
    app(prog_name="genpath")


__all__ = ["app", "main"]
