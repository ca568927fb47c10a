"""What every ``genpath`` command shares: one-line errors, the progress display, the failure summary."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from typer.core import TyperGroup

from genpath.utils.logging import get_logger

console = Console(stderr=True)
#: Set by ``genpath --debug``: errors keep their traceback.
DEBUG = {"on": False}
logger = get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 0 all done, 1 some items failed (the rest were written), 2 bad arguments or config.
EXIT_FAILED_ITEMS = 1
EXIT_USAGE = 2


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on one line to stderr and exit with code 2 (bad argument or config)."""
    console.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=EXIT_USAGE)


def user_errors(function: F) -> F:
    """Turn ``ValueError`` / ``FileNotFoundError`` / ``NotADirectoryError`` from a command into :func:`fail`.

    Library code raises these with one-line messages that name the argument; a command lets
    them through this decorator, so the user sees that line (exit code 2), never a traceback.
    I/O errors (an ``--out`` that is a file, a read-only folder, a full disk) end the same way.
    With ``genpath --debug`` the error is raised with its traceback instead (a ValueError from
    deep inside a run may be a bug rather than a bad argument).
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (ValueError, OSError) as error:
            if DEBUG["on"]:
                raise
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
                where = f" ({error.filename})" if getattr(error, "filename", None) else ""
                message = f"{type(error).__name__}{where}: {error.strerror or message}"
            fail(message)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bars(*descriptions: str) -> Iterator[list[Callable[..., None]]]:
    """Show progress bars on a terminal (silent otherwise), one per description, in one display.

    Yields one ``update(completed=, total=, advance=, description=)`` per bar.
    """
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        tasks = [progress.add_task(description, total=None) for description in descriptions]
        yield [functools.partial(progress.update, task) for task in tasks]


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
    """Show one progress bar on a terminal (silent otherwise); yields ``update(completed=, total=, advance=)``."""
    with progress_bars(description) as (update,):
        update(total=total)
        yield update


def report_failures(rows: list[dict[str, Any]], summary: str) -> None:
    """Print ``summary`` and one line per failed row; exit with code 1 when any failed."""
    failed = [row for row in rows if row.get("status") == "failed"]
    console.print(summary, highlight=False)
    for row in failed:
        console.print(f"[red]failed[/red] {escape(str(row['input']))}: {escape(str(row.get('error', '')))}",
                      highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(code=EXIT_FAILED_ITEMS)


class LegacyDefaultGroup(TyperGroup):
    """A group whose old form ``GROUP INPUTS...`` (no subcommand) still runs, through its hidden ``auto`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["auto", *args]
        return super().parse_args(ctx, args)
