"""Checks on output locations, done before any work starts."""

from __future__ import annotations

from pathlib import Path


def require_output_folder(out: str | Path, argument: str = "out") -> Path:
    """Return ``out`` as a ``Path`` after checking it can be an output folder (missing, or a folder).

    Raises:
        ValueError: ``out`` is an existing file (one line, naming ``argument``).

    Example:
        >>> require_output_folder("no/such/folder/yet").as_posix()
        'no/such/folder/yet'
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{argument}: expected an output folder, got the existing file {out}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{argument}: expected an output folder, got {out} under the file {parent}")
            break
    return out
