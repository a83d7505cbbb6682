"""The leakage guard: calibration must never see the fidelity-test sets.

A text is *protected* when its normalised hash, or the hash of its first ``PREFIX_CHARS`` normalised characters,
appears in a fidelity-test set (so a truncated copy of a test passage is caught too). The protected hashes are
computed from the data dir (``$SFR_EXPORT_DATA_DIR`` or ``../shared/data`` beside the repo root) when it exists,
and from the list shipped in ``sfr_export.calibration/protected.sha256`` otherwise (both when both exist).

Fidelity-test sets: STSBenchmark test (both sentences), TRECCOVID queries and every qrels-judged passage (title,
text, and title + text), Banking77Classification test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from ..errors import CalibrationError

PREFIX_CHARS = 160
HASH_HEX = 16  # 64-bit prefixes of sha256: ~10^4 protected texts, collisions negligible
SHIPPED_NAME = "protected.sha256"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def _h(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:HASH_HEX]


def text_hash(text: str) -> str:
    return _h(normalize(text))


def text_hashes(text: str) -> set[str]:
    """The full-text hash and (for long texts) the prefix hash."""
    n = normalize(text)
    out = {_h(n)}
    if len(n) > PREFIX_CHARS:
        out.add(_h("prefix:" + n[:PREFIX_CHARS]))
    return out


def data_dir() -> Path:
    env = os.environ.get("SFR_EXPORT_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def fidelity_test_texts(root: Path) -> Iterable[str]:
    """Every text of the fidelity-test sets found under ``root`` (missing sets are skipped)."""
    stsb = root / "STSBenchmark" / "stsb-en-test.csv"
    if stsb.is_file():
        with open(stsb, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                yield from row[:2]
    trec = root / "TRECCOVID"
    if (trec / "queries.jsonl").is_file():
        for line in (trec / "queries.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)["text"]
    if (trec / "qrels" / "test.tsv").is_file() and (trec / "corpus.jsonl").is_file():
        judged = {ln.split("\t")[1] for ln in (trec / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()[1:] if ln}
        for line in (trec / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            if d["_id"] in judged:
                yield from (t for t in (d.get("title", ""), d["text"], f"{d.get('title', '')} {d['text']}") if t.strip())
    bank = root / "Banking77Classification" / "test.csv"
    if bank.is_file():
        with open(bank, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                yield r["text"]


def hashes_from_data(root: Path) -> set[str]:
    out: set[str] = set()
    for t in fidelity_test_texts(root):
        if t and t.strip():
            out |= text_hashes(t)
    return out


def shipped_hashes_path() -> Path:
    from ..calibration import calibration_path

    return calibration_path(SHIPPED_NAME)


@lru_cache(maxsize=4)
def protected_hashes(root: Path | None = None) -> frozenset[str]:
    """Protected hashes from the data dir (if present) united with the shipped list."""
    root = Path(root) if root is not None else data_dir()
    out: set[str] = set()
    if root.is_dir():
        out |= hashes_from_data(root)
    shipped = shipped_hashes_path()
    if shipped.is_file():
        out |= {ln.strip() for ln in shipped.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")}
    if not out:
        raise CalibrationError(f"no fidelity-test hashes found (data dir {root} missing and no shipped {SHIPPED_NAME}): "
                               "the leakage guard cannot run; set SFR_EXPORT_DATA_DIR")
    return frozenset(out)


def check_no_leakage(texts: Iterable[tuple[str, str]], protected: frozenset[str] | None = None) -> None:
    """Raise CalibrationError naming the first few (source, text) pairs that appear in a fidelity-test set."""
    protected = protected if protected is not None else protected_hashes()
    hits = [(src, t) for src, t in texts if text_hashes(t) & protected]
    if hits:
        shown = "; ".join(f"{src}: {t[:50]!r}" for src, t in hits[:3])
        raise CalibrationError(f"{len(hits)} calibration text(s) appear in a fidelity-test set (STSBenchmark test, "
                               f"TRECCOVID queries/judged passages, Banking77 test) and are refused: {shown}")


def write_shipped(root: Path, out: Path) -> int:
    hashes = sorted(hashes_from_data(root))
    out.write_text("# sha256[:16] of normalised fidelity-test texts (and 160-char prefixes); see sfr_export/quant/leakage.py\n"
                   + "\n".join(hashes) + "\n", encoding="utf-8")
    return len(hashes)
