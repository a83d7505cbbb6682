"""Where downloaded and materialised models live: ``$SFR_EXPORT_CACHE`` (default ``~/.cache/sfr-export``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SFR_EXPORT_CACHE", Path.home() / ".cache" / "sfr-export"))
