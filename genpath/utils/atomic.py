r"""Atomic file and folder writes: a reader sees the old file or the new one, never half of one.

Every writer creates a hidden temporary sibling (``.<name>.<random><suffix>``), fills it, gives
it the usual ``0o644`` permissions and renames it over the destination with :func:`os.replace`
(atomic on POSIX and Windows within one file system). On any error the temporary file is
removed, so no 0-byte leftovers stay behind.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "a.json", {"x": 1}).read_text()
    '{\n "x": 1\n}'
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "temporary_in_use",
    "PeriodicJsonWriter",
    "atomic_directory",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_yaml",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed to ``path``, on error removed.

    For writers that want a file name (``np.savez``, ``PIL.Image.save``, ``zarr``): write to the
    yielded path, keeping its suffix (it ends like ``path``).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> target.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: a cleanup can tell a killed run's leftover from a live run's file
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: ``.<name>.<pid>-<random><suffix>``: the name :func:`atomic_path` gives its temporary file.
_TEMPORARY_PID = re.compile(r"\.(\d+)-[^.]*\.[^.]+$")


def temporary_in_use(path: str | Path, min_age: float = 120.0) -> bool:
    """Whether a hidden temporary file may still be being written (by a live process, or recently).

    A name carrying the pid of a live process other than this one is in use; a name from another
    writer (no pid) counts as in use while younger than ``min_age`` seconds. Everything else is a
    leftover of a killed run, safe to delete.
    """
    path = Path(path)
    match = _TEMPORARY_PID.search(path.name)
    if match is None:
        return time.time() - path.lstat().st_mtime < min_age
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any, indent: int = 1) -> Path:
    """Write ``data`` as JSON atomically (NaN/inf refused: they are not JSON); returns ``path``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False, default=str))


def atomic_write_yaml(path: str | Path, data: Any) -> Path:
    """Write ``data`` as YAML (``yaml.safe_dump``, keys in insertion order) atomically."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def atomic_write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write ``rows`` under the header ``fields`` atomically; None becomes an empty cell, extra keys are dropped."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return atomic_write_text(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder ``.<name>.tmp``; on success it replaces ``path``, on error it is removed.

    For ``save_pretrained`` and other folder writers: ``path`` exists only once complete. An
    existing ``path`` is replaced only after the new folder is fully written. The temporary
    name is fixed (not random), so a run killed mid-write leaves one ``.<name>.tmp`` that the
    next write of ``path`` clears. One process at a time per ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class PeriodicJsonWriter:
    r"""Rewrite a JSON file atomically at most every ``interval`` seconds (and always on :meth:`flush`).

    A growing manifest rewritten after every item costs O(n²) bytes; this keeps it current to
    within ``interval`` seconds at O(n) cost per rewrite, so a killed run still leaves a
    manifest of (nearly) everything it finished.

    Example:
        >>> import tempfile, pathlib
        >>> writer = PeriodicJsonWriter(pathlib.Path(tempfile.mkdtemp()) / "m.json", interval=60)
        >>> writer.update([1]); writer.update([1, 2]); writer.flush([1, 2, 3])
        >>> writer.path.read_text()
        '[\n 1,\n 2,\n 3\n]'
    """

    def __init__(self, path: str | Path, interval: float = 5.0) -> None:
        self.path, self.interval = Path(path), float(interval)
        self._last = float("-inf")

    def update(self, data: Any) -> None:
        """Write ``data`` if the last write is older than ``interval`` seconds."""
        import time

        if time.monotonic() - self._last >= self.interval:
            self.flush(data)

    def flush(self, data: Any) -> None:
        """Write ``data`` now."""
        import time

        atomic_write_json(self.path, data)
        self._last = time.monotonic()

