"""Where patchbench keeps its caches: ``$PATCHBENCH_HOME`` (default ``~/.cache/patchbench``)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The cache root; every store, download and decoded dataset lives under it."""
    return Path(os.environ.get("PATCHBENCH_HOME", "~/.cache/patchbench")).expanduser()
