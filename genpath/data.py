"""Where the optional shared research data lives (tests and benchmarks only).

One setting: the environment variable ``GENPATH_SHARED_DATA``; by default ``../shared/data``
beside the project root. Users who clone the project usually do not have it; code that reads
it must skip cleanly when :func:`shared_data_root` returns None.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_data_root() -> Path | None:
    """Return the shared data folder if it exists, else None."""
    root = Path(os.environ.get("GENPATH_SHARED_DATA", DEFAULT_SHARED_DATA))
    return root if root.is_dir() else None
