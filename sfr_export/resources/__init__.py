"""Package data: the task-instruction table and the small shipped evaluation suite."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def resource_path(name: str) -> Path:
    return Path(str(resources.files(__name__).joinpath(name)))
