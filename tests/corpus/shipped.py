"""Texts from the data shipped in this repository (calibration and eval subsets), for the corpus tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JSONL_SOURCES = sorted((REPO / "calibration" / "data").glob("*.jsonl")) + [
    REPO / "sfr_export" / "eval" / "data" / "LegalSummarization" / "corpus.jsonl",
    REPO / "sfr_export" / "eval" / "data" / "LegalSummarization" / "queries.jsonl",
]
CSV_SOURCES = sorted((REPO / "sfr_export" / "eval" / "data").glob("*/*.csv"))


def shipped_texts(n: int) -> list[str]:
    """``n`` distinct non-empty texts, in a fixed order (JSONL ``text`` fields first, then CSV text columns)."""
    seen: dict[str, None] = {}
    for path in JSONL_SOURCES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                t = json.loads(line).get("text")
                if isinstance(t, str) and t.strip():
                    seen.setdefault(t, None)
    for path in CSV_SOURCES:
        with open(path, encoding="utf-8", newline="") as fh:
            for row in csv.reader(fh):
                for cell in row:
                    if len(cell) > 20:
                        seen.setdefault(cell, None)
    texts = list(seen)
    if len(texts) < n:
        raise AssertionError(f"shipped data holds {len(texts)} distinct texts, the test needs {n}")
    return texts[:n]
