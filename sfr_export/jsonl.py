"""The one JSONL reader behind every input file (eval data, fine-tuning data, calibration data, mining corpora).

Lines are numbered from 1, blank lines are skipped, and every failure names ``path:line``. Callers choose the
error class (their stage's ``SfrExportError`` subclass) and whether a bad line stops the read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SfrExportError


def numbered_lines(path: Path, error: type[SfrExportError], what: str = "data file") -> Iterator[tuple[int, str]]:
    """Non-blank lines of ``path`` with their 1-based numbers; a missing file raises ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                yield line_no, line


def parse_object(line: str, where: str, error: type[SfrExportError]) -> dict[str, Any]:
    """One JSONL line that must hold a JSON object; ``where`` (``path:line``) prefixes the error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def iter_objects(path: Path, error: type[SfrExportError], what: str = "data file") -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each line; the first bad line raises ``error`` naming ``path:line``."""
    for line_no, line in numbered_lines(path, error, what):
        yield line_no, parse_object(line, f"{path}:{line_no}", error)
