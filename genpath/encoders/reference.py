"""``encoder.json``: which registered encoder a saved model expects its embeddings from.

Pipelines conditioned on embeddings and HistAug models store one next to their weights, so
``genpath synth`` and the benchmarks can embed images with the right encoder.

A model folder is untrusted input (shared, downloaded), so reading its ``encoder.json`` follows
a trust boundary:

* an encoder that runs code from a file (``torchscript``) is never created from a folder's
  JSON, unless the caller passes ``allow_code=True`` (the CLI's ``--trust-model-code``);
* every weight path it names must be relative and resolve *inside* the folder; anything else
  (``../../etc``, an absolute path) is refused, and the encoder must then be given explicitly;
* built-in presets (``genpath-small.samples``: the shipped encoder inside the package) need no
  path at all; a published preset (``uni2-h``) records its name, its weight path and any
  architecture overrides, nothing else (its recipe is in :mod:`genpath.encoders.published`).

:func:`save_encoder_reference` keeps folders self-contained: a ``genpath-small`` encoder from
outside the folder is copied into ``folder/encoder`` (it is small); the shipped encoder is
recorded as its preset; other weights outside the folder (a 1 GB UNI checkpoint) are recorded
as a hint only, and loading then asks for them explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from genpath.encoders.base import ImageEncoder
from genpath.encoders.registry import create_encoder, encoder_runs_code
from genpath.utils.atomic import atomic_write_json

_PATH_KEYS = ("path", "checkpoint_path")
SHIPPED_PRESETS = {"genpath-small.samples": "samples/checkpoints/encoder_small"}


def _shipped_preset(name: str, kwargs: dict[str, Any]) -> str | None:
    """Return the built-in preset a (name, path) pair points at, if any."""
    from genpath.data import PROJECT_ROOT

    path = kwargs.get("path")
    if name.partition(".")[0] != "genpath-small" or path is None or set(kwargs) - {"path"}:
        return None
    for preset, relative in SHIPPED_PRESETS.items():
        if Path(path).resolve() == (PROJECT_ROOT / relative).resolve():
            return preset
    return None


def save_encoder_reference(folder: str | Path, name: str, kwargs: dict[str, Any]) -> Path:
    """Write ``folder/encoder.json`` naming the registered encoder ``name`` and its ``kwargs``.

    Paths inside ``folder`` are stored relative to it; a ``genpath-small`` folder from elsewhere
    is copied into ``folder/encoder``; the shipped encoder becomes its preset name; any other
    outside path is stored under ``external`` as a hint that loading will not follow.
    """
    folder = Path(folder)
    for key, value in kwargs.items():
        try:
            json.dumps(str(value) if key in _PATH_KEYS and value is not None else value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(f"encoder kwargs: expected JSON values that encoder.json can record, got {key}={value!r} "
                             "(layer classes: use a published preset such as 'uni2-h' or 'virchow2', which names "
                             "them)") from None
    preset = _shipped_preset(name, kwargs)
    if preset is not None:
        return atomic_write_json(folder / "encoder.json", {"name": preset, "kwargs": {}})
    stored: dict[str, Any] = {}
    external: dict[str, str] = {}
    for key, value in kwargs.items():
        if key in _PATH_KEYS and value is not None and not Path(value).is_absolute() and not Path(value).exists():
            stored[key] = str(value)  # already relative to the folder (the loader checks it stays inside)
            continue
        if key in _PATH_KEYS and value is not None:
            path = Path(value).resolve()
            if path.is_relative_to(folder.resolve()):
                value = os.path.relpath(path, folder.resolve())
            elif name.partition(".")[0] == "genpath-small" and path.is_dir():
                shutil.copytree(path, folder / "encoder", dirs_exist_ok=True)
                value = "encoder"
            else:
                external[key] = str(path)
                continue
        stored[key] = str(value) if isinstance(value, Path) else value
    record = {"name": name, "kwargs": stored, **({"external": external} if external else {})}
    return atomic_write_json(folder / "encoder.json", record)


def read_encoder_reference(folder: str | Path) -> dict[str, Any]:
    """Parse and check ``folder/encoder.json`` (structure only); returns ``{"name", "kwargs", ...}``.

    Raises:
        FileNotFoundError: no ``encoder.json``.
        ValueError: not a JSON object with a string ``name`` and a ``kwargs`` mapping.
    """
    record = Path(folder) / "encoder.json"
    if not record.is_file():
        raise FileNotFoundError(f"model: expected {record} naming the encoder of its embeddings, got none")
    try:
        spec = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"encoder.json: expected JSON in {record}, got a parse error ({error})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs", {}),
                                                                                              dict):
        raise ValueError(f"encoder.json: expected {{'name': str, 'kwargs': {{...}}}} in {record}, got {spec!r:.80}")
    return spec


def resolve_inside(folder: str | Path, value: Any, argument: str) -> Path:
    """Resolve a path a folder's JSON names; it must be relative and stay inside ``folder``.

    Raises:
        ValueError: an absolute path, or one that resolves outside ``folder`` (``..``, symlinks).

    Example:
        >>> resolve_inside("models/ldm", "encoder", "encoder.json path").as_posix().endswith("models/ldm/encoder")
        True
        >>> resolve_inside("models/ldm", "../../etc", "encoder.json path")
        Traceback (most recent call last):
        ...
        ValueError: encoder.json path: expected a path inside models/ldm, got '../../etc' (...)
    """
    root = Path(folder).resolve()
    if not isinstance(value, str) or Path(value).is_absolute():
        raise ValueError(f"{argument}: expected a relative path inside {folder}, got {value!r} "
                         "(a model folder may only name its own files)")
    target = (root / value).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{argument}: expected a path inside {folder}, got {value!r} "
                         "(a model folder may only name its own files)")
    return target


def load_encoder_reference(folder: str | Path, allow_code: bool = False) -> ImageEncoder:
    """Create the encoder recorded in ``folder/encoder.json``, within the trust boundary (see the module doc).

    Args:
        folder: the model folder.
        allow_code: also create encoders that run code from a file (TorchScript). Only for
            folders the user explicitly trusts (``--trust-model-code``).

    Raises:
        FileNotFoundError: no ``encoder.json``, or its weights are missing.
        ValueError: a code-running encoder without ``allow_code``, a path outside the folder,
            weights recorded only as an outside hint, or a malformed record.
    """
    folder = Path(folder)
    spec = read_encoder_reference(folder)
    name = spec["name"]
    if encoder_runs_code(name) and not allow_code:
        raise ValueError(f"encoder.json: expected an encoder that loads weights only, got {name!r} in {folder}, "
                         "which runs code from a file; genpath never runs code named by a model folder "
                         "(pass the encoder explicitly, or --trust-model-code if you trust this folder)")
    if spec.get("external"):
        raise ValueError(f"encoder.json: expected the encoder's weights inside {folder}, got them outside "
                         f"({spec['external']}); pass the encoder explicitly")
    kwargs = {k: (str(resolve_inside(folder, v, f"encoder.json {k}")) if k in _PATH_KEYS else v)
              for k, v in spec.get("kwargs", {}).items()}
    return create_encoder(name, **kwargs)


def copy_encoder_reference(source: str | Path, destination: str | Path) -> Path:
    """Copy ``source/encoder.json`` to ``destination`` (weights inside ``source`` are re-based or copied)."""
    source = Path(source)
    spec = read_encoder_reference(source)
    kwargs = {k: (str(resolve_inside(source, v, f"encoder.json {k}")) if k in _PATH_KEYS else v)
              for k, v in spec.get("kwargs", {}).items()}
    if spec.get("external"):
        kwargs.update(spec["external"])
    return save_encoder_reference(destination, spec["name"], kwargs)
