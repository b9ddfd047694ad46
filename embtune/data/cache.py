"""Where work shared between runs is kept (built data sets, token ids, base-model metrics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where work shared between runs is kept: ``$EMBTUNE_CACHE``, default ``~/.cache/embtune``."""
    return Path(os.environ.get("EMBTUNE_CACHE") or Path.home() / ".cache" / "embtune").expanduser()
