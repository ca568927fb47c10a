"""Helpers of the ``genpath convert`` commands: the SHA-256 of a source file, the converted folder's atomic write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from genpath.utils.atomic import atomic_directory

#: The record every converted folder holds next to its weights.
CONVERSION_FILE = "conversion.json"


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's contents, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_converted(pipe: Any, out: Path, record: dict[str, Any]) -> None:  # noqa: ANN401 - any save_pretrained
    """Write ``pipe`` (``save_pretrained``, safetensors) and ``record`` as ``out/conversion.json``, atomically.

    The folder is complete or absent: it replaces ``out`` only once both are written.
    """
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=1, default=str))
