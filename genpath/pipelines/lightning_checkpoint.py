"""Read the weights of a PyTorch Lightning ``.ckpt`` without unpickling code.

A Lightning checkpoint is a ``torch.save`` pickle: ``state_dict`` plus training state
(``epoch``, ``global_step``, ``optimizer_states``, ``lr_schedulers``, ``callbacks``, ...).
:func:`read_lightning_state_dict` reads it with ``torch.load(weights_only=True)``, which builds
only tensors and plain containers and refuses every other global before creating anything.

One thing breaks that for old checkpoints: Lightning ≤ 1.4 (the CompVis latent-diffusion
family, e.g. Graikos et al.'s ``pytorch-lightning==1.4.2``) keys ``checkpoint["callbacks"]`` by
the callback *class* (``callback_states[type(callback)] = state``), so the pickle names
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` and ``weights_only`` refuses
the file. Those names are only dictionary keys, never called, so they are replaced by inert
stand-in classes defined here (nothing is imported from Lightning, nothing runs):

1. the file is tried as is; on a refusal, the globals it names are listed without unpickling
   (``torch.serialization.get_unsafe_globals_in_checkpoint``);
2. when every one is a Lightning callback class (:data:`MARKER_PREFIXES`), each gets a
   stand-in that refuses to be instantiated, and the file is read again; any other global
   (``os.system``, ``builtins.eval``, a model class) is refused, one line naming it;
3. only ``state_dict`` is kept and it must map names to tensors.

Example:
    >>> weights, stubbed = read_lightning_state_dict("last.ckpt")  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from genpath.utils.logging import get_logger
from genpath.utils.state_dict import as_state_dict

logger = get_logger(__name__)

#: Globals that may be replaced by inert stand-ins: Lightning callback classes (dictionary keys).
MARKER_PREFIXES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
                AttributeError, TypeError, KeyError, IndexError, ImportError, UnicodeDecodeError)


class _Marker:
    """Base of the stand-ins: usable as a dictionary key, never instantiated (an attempt is recorded in ``_seen``)."""

    _seen: list[str] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> _Marker:
        cls._seen.append(cls.__qualname__)
        raise pickle.UnpicklingError(f"the checkpoint instantiates {cls.__qualname__} (only its name is expected)")


def _first_line(error: BaseException) -> str:
    """Return the reason of a read error in one line (torch's weights-only refusal: its own reason line)."""
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = rest.split(". Please use")[0] if rest else text
    return (text.splitlines()[0][:200] if text else type(error).__name__).replace("\x1b[1m", "").replace("\x1b[0m", "")


def _load(path: Path, stand_ins: list[tuple[type, str]] | None = None) -> Any:
    """``torch.load(weights_only=True)`` (memory-mapped for zip files), with ``stand_ins`` allowed."""
    mmap = zipfile.is_zipfile(path)
    if not stand_ins:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unsafe_globals(path: Path) -> list[str]:
    """List the globals ``weights_only`` refuses in ``path``, read without unpickling (zip files only)."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except _READ_ERRORS:
        return []


def read_lightning_checkpoint(path: str | Path, argument: str = "src", what: str = "checkpoint"
                              ) -> tuple[Any, list[str]]:
    """Return the loaded object of a ``.ckpt``/``.pt``/``.pth`` file (weights-only) and the globals stubbed.

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        ValueError: one line naming ``argument``: the file cannot be read weights-only (a
            global other than a Lightning callback class, a broken file); nothing is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: expected a {what} file, got {path} "
                                f"({'a folder' if path.is_dir() else 'missing'})")
    refusal = f"{argument}: expected a {what} that torch.load(weights_only=True) reads, got {path}"
    try:
        return _load(path), []
    except _READ_ERRORS as error:
        first = error
    names = _unsafe_globals(path)
    if not names:
        raise ValueError(f"{refusal} ({type(first).__name__}: {_first_line(first)}); genpath never unpickles "
                         "code") from None
    unsafe = [n for n in names if not n.startswith(MARKER_PREFIXES)]
    if unsafe:
        raise ValueError(f"{refusal} naming the globals {unsafe[:5]} (only Lightning callback class names are "
                         "accepted, as inert stand-ins); genpath never unpickles code") from None
    seen: list[str] = []
    stand_ins = [(type(n.rpartition(".")[2], (_Marker,), {"__module__": __name__, "_seen": seen}), n) for n in names]
    try:
        data = _load(path, stand_ins)
    except _READ_ERRORS as error:
        reason = f"it instantiates {seen[0]}, whose name alone is accepted" if seen else \
            f"{type(error).__name__}: {_first_line(error)}"
        raise ValueError(f"{refusal} ({reason}); genpath never unpickles code") from None
    logger.info("%s: replaced %s by inert stand-ins (Lightning callback classes used as keys)", path, names)
    return data, names


def read_lightning_state_dict(path: str | Path, argument: str = "src", what: str = "Lightning checkpoint"
                              ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return ``state_dict`` of a Lightning checkpoint (or a bare state dict, or a ``.safetensors`` file).

    Returns:
        The name → tensor mapping and the Lightning class names replaced by stand-ins.

    Raises:
        FileNotFoundError: ``path`` is missing or a folder.
        ValueError: the file is not weights-only readable, or holds no state dict of tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: expected a {what} file, got {path} "
                                    f"({'a folder' if path.is_dir() else 'missing'})")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"{argument}: expected a readable safetensors file, got {path} "
                             f"({_first_line(error)})") from None
        stubbed: list[str] = []
    else:
        data, stubbed = read_lightning_checkpoint(path, argument, what)
    return as_state_dict(data, path, argument), stubbed
