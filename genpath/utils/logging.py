"""genpath's loggers (the diffusers/accelerate pattern): one ``logger`` per module, under ``genpath``.

Library code never prints: it logs to ``logging.getLogger(__name__)`` (``get_logger``). By
default only warnings reach the user; the CLI's ``--verbose`` or :func:`set_verbosity` opens
the rest.

Example:
    >>> logger = get_logger("genpath.example")
    >>> logger.name
    'genpath.example'
"""

from __future__ import annotations

import logging
import sys

_ROOT = "genpath"


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``name`` (pass ``__name__``); genpath's, normalization's and augment's share settings."""
    return logging.getLogger(name)


def set_verbosity(level: int) -> None:
    """Set the level of genpath's loggers (``genpath``, ``normalization``, ``augment``); add a stderr handler."""
    for root in (_ROOT, "normalization", "augment"):
        logger = logging.getLogger(root)
        logger.setLevel(level)
        if not logger.handlers:
            handler = _CurrentStderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


class _CurrentStderrHandler(logging.StreamHandler):
    """Write to whatever ``sys.stderr`` is *now* (a test runner or a CLI wrapper may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)

