"""Where Weightsmith keeps its caches: ``$WEIGHTSMITH_HOME`` or the user's cache dir."""

from __future__ import annotations

import os
from pathlib import Path


def weightsmith_home() -> Path:
    """Root of every on-disk cache (converted models, ROME statistics)."""
    env = os.environ.get("WEIGHTSMITH_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "weightsmith"
