"""``run.json``: the settings a run wrote its outputs with, so a rerun cannot silently mix settings.

A tile-mode command records a fingerprint of everything that decides its outputs. A rerun into
the same folder with the same settings goes ahead (it resumes, or rewrites identical outputs);
with other settings it is refused unless ``overwrite``, which first deletes the files the
previous run recorded as its outputs (and nothing else).

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> check_run_settings(out, "normalize tiles", {"method": "macenko"})
    >>> check_run_settings(out, "normalize tiles", {"method": "reinhard"})
    Traceback (most recent call last):
    ...
    ValueError: out: expected the settings of the run already in ... (or --overwrite), got different method
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genpath.utils.atomic import atomic_write_json
from genpath.utils.logging import get_logger

logger = get_logger(__name__)
RUN_FILE = "run.json"


def _recorded(out: Path, command: str) -> dict[str, Any] | None:
    record = out / RUN_FILE
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("created_by") != f"genpath {command}":
        return {}
    return data.get("settings") if isinstance(data.get("settings"), dict) else {}


def check_run_settings(out: str | Path, command: str, settings: dict[str, Any], overwrite: bool = False,
                       previous_outputs: Iterable[str | Path] = ()) -> None:
    """Refuse a rerun into ``out`` with other settings (unless ``overwrite``), then record ``settings``.

    Args:
        out: the output folder.
        command: the command's name (``normalize tiles``, ``translate tiles``).
        settings: JSON-serializable fingerprint of what decides the outputs.
        overwrite: allow other settings: the previous run's recorded outputs are deleted first.
        previous_outputs: the files the previous run wrote (from its manifest); only these are
            deleted on ``overwrite``.

    Raises:
        ValueError: ``out`` holds a run with other settings, or outputs of a run without a
            ``run.json`` (one line; nothing is touched).
    """
    out = Path(out)
    settings = json.loads(json.dumps(settings, allow_nan=False, default=str))
    previous = _recorded(out, command)
    expected = f"out: expected the settings of the run already in {out} (or --overwrite), got"
    if previous == settings:
        return
    if not overwrite:
        if previous == {}:
            raise ValueError(f"{expected} a {RUN_FILE} that genpath {command} did not write")
        if previous is not None:
            keys = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
            raise ValueError(f"{expected} different {', '.join(keys)}")
        if (out / "manifest.json").is_file():
            raise ValueError(f"{expected} outputs without {RUN_FILE} (an older genpath or another program)")
    else:
        removed = 0
        for path in previous_outputs:
            path = Path(path)
            if path.is_file() and path.resolve().is_relative_to(out.resolve()):
                path.unlink()
                removed += 1
        (out / "manifest.json").unlink(missing_ok=True)
        logger.info("--overwrite: removed %d outputs of the previous run in %s", removed, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, {"created_by": f"genpath {command}", "settings": settings})


def previous_manifest_outputs(out: str | Path) -> list[str]:
    """Return the outputs listed in ``out/manifest.json`` (a tile manifest), or none."""
    try:
        rows = json.loads((Path(out) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [r["output"] for r in rows if isinstance(r, dict) and isinstance(r.get("output"), str)] \
        if isinstance(rows, list) else []
