r"""Run configurations: YAML files in ``configs/`` loaded into typed dataclasses.

:func:`load_config` reads one file (optionally one top-level section) into a dataclass and
refuses what would otherwise be silently ignored or crash later: YAML syntax errors, a
misspelt key, a value of the wrong type (``batch_size: "32"``), NaN or infinite numbers. Every
error is a one-line ``ValueError`` naming the file, the key, what was expected and what was got.
:func:`check_types` applies the same checks to a dataclass built in code (used by the CLI).

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Run:
    ...     steps: int = 10
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.yaml"
    >>> _ = path.write_text("run:\n  steps: 20\n")
    >>> load_config(path, Run, section="run")
    Run(steps=20)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with ``yaml.safe_load``; a missing file or bad syntax is a one-line error.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the YAML does not parse (the message gives the line and column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: expected a YAML file, got {path} (missing)")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"config: expected valid YAML in {path}, got a syntax error{where}: {problem}") from None


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a (simple) type annotation: scalars, Optional/unions, list, dict, Literal."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            return False
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value) if inner is not Ellipsis else True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # anything richer is the dataclass's own __post_init__'s job


def _describe(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _accepts_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and float in typing.get_args(annotation)


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: accept it where a float is expected."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_types(cls: type, data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """Check ``data`` against the fields of dataclass ``cls``: known keys, matching types, finite numbers.

    Returns:
        A copy of ``data`` with numeric strings in float fields (YAML's ``1e-4``) made floats.

    Raises:
        ValueError: one line naming the key (``where`` says which file or section).
    """
    data = dict(data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected some of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        annotation = hints.get(key, Any)
        if _accepts_float(annotation):
            value = data[key] = _as_float(value)
        if not _matches(value, annotation):
            raise ValueError(f"{key}: expected {_describe(annotation)} in {where}, got {value!r} "
                             f"({type(value).__name__})")
        if not _finite(value):
            raise ValueError(f"{key}: expected finite numbers in {where}, got {value!r}")
    return data


def load_config(path: str | Path, cls: type[T], section: str | None = None) -> T:
    """Load a YAML file (optionally one top-level ``section``) into dataclass ``cls``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: bad YAML, not a mapping, unknown keys, wrong types, NaN/inf, or whatever
            ``cls.__post_init__`` refuses (one line each).
    """
    path = Path(path)
    data = read_yaml(path)
    data = {} if data is None else data
    where = str(path)
    if section is not None:
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a mapping with a '{section}' section in {path}, "
                             f"got {type(data).__name__}")
        data = data.get(section) or {}
        where = f"{path} ({section})"
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping in {where}, got {type(data).__name__}")
    data = check_types(cls, data, where)
    try:
        return cls(**data)
    except TypeError as error:  # a required field missing
        raise ValueError(f"config: {error} in {where}") from None
