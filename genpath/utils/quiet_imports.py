"""Third-party imports whose import-time warnings are not the user's business, silenced narrowly.

kornia (0.8) calls ``torch.jit.script`` at import time, which torch 2.14 answers with a
``FutureWarning`` ("torch.jit.script is deprecated") printed on a user's very first command.
The warning is about kornia's code, not the user's, and nothing a user can act on, so
:func:`import_kornia` imports kornia with exactly that message filtered, for that import only.
Every other warning passes.

Example:
    >>> kornia = import_kornia()
    >>> hasattr(kornia, "augmentation")
    True
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

_KORNIA_IMPORT_WARNINGS = (r".*torch\.jit\.script.*", r".*torch\.jit\.script_method.*")


def import_kornia() -> ModuleType:
    """Import ``kornia`` (and ``kornia.augmentation``) without its import-time TorchScript deprecation warnings."""
    with warnings.catch_warnings():
        for message in _KORNIA_IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        kornia = importlib.import_module("kornia")
        importlib.import_module("kornia.augmentation")
    return kornia
