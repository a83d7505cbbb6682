"""Rebuild the shipped calibration texts in ``calibration/data/`` from ``../shared/data`` (run once, committed).

    python scripts/build_calibration_data.py [DATA_DIR]

Only license-compatible sources are used (see CREDITS.md); every fidelity-test text is excluded here AND refused
again at calibration time by the hash guard (``sfr_export.quant.leakage``). Deterministic: a fixed seed.
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "calibration"
SEED = 20241130
MAX_CHARS = 1200  # keep passages short enough to ship; the tokenizer truncates anyway


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(name: str, rows: list[dict]) -> None:
    out = HERE / "data" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{out.relative_to(HERE)}: {len(rows)} rows, {out.stat().st_size} bytes")


def main(data_dir: Path) -> None:
    sys.path.insert(0, str(HERE.parent))
    from sfr_export.quant.leakage import hashes_from_data, text_hashes, write_shipped

    protected = hashes_from_data(data_dir)
    print(f"protected.sha256: {write_shipped(data_dir, HERE / 'protected.sha256')} hashes")
    rng = random.Random(SEED)

    def keep(text: str) -> bool:
        return bool(text.strip()) and not (text_hashes(text) & protected)

    # STSBenchmark dev: held-out scored pairs (build-time ΔSpearman) + 500 sentences of other pairs for calibration.
    # Pairs: 300 drawn first, then every other pair neither of whose sentences is in the calibration pool, then the
    # rest. A build drops the pairs that hold a text it drew (sfr_export.quant.recipe.sample_recipe), so the rest
    # count wherever the build left their texts unused: the gate's ΔSpearman noise floor shrinks as 1/sqrt(pairs).
    with open(data_dir / "STSBenchmark" / "stsb-en-dev.csv", newline="", encoding="utf-8") as f:
        pairs = [(a, b, float(s)) for a, b, s in csv.reader(f) if keep(a) and keep(b)]
    rng.shuffle(pairs)
    held, rest = pairs[:300], pairs[300:]
    held_texts = {t for a, b, _ in held for t in (a, b)}
    sts = sorted({t for a, b, _ in rest for t in (a, b)} - held_texts)
    rng.shuffle(sts)
    calib_sts = sts[:500]
    used = set(calib_sts)
    held += [(a, b, s) for a, b, s in rest if a not in used and b not in used]
    held += [(a, b, s) for a, b, s in rest if a in used or b in used]
    _write("stsb_dev_pairs.jsonl", [{"text1": a, "text2": b, "score": s} for a, b, s in held])
    _write("stsb_dev.jsonl", [{"text": t, "task": "sts"} for t in calib_sts])

    with open(data_dir / "Banking77Classification" / "train.csv", newline="", encoding="utf-8") as f:
        bank = [r["text"] for r in csv.DictReader(f) if keep(r["text"])]
    rng.shuffle(bank)
    _write("banking77_train.jsonl", [{"text": t, "task": "classification"} for t in bank[:500]])

    judged = {line.split("\t")[1] for line in (data_dir / "TRECCOVID" / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    docs = [d for d in _jsonl(data_dir / "TRECCOVID" / "corpus.jsonl") if d["_id"] not in judged]
    passages = [(d["title"] + " " + d["text"]).strip()[:MAX_CHARS] for d in docs]
    titles = [d["title"] for d in docs if d["title"].strip()]
    _write("treccovid_unjudged_passages.jsonl", [{"text": t, "task": "retrieval_passage"} for t in passages if keep(t)][:150])
    _write("clustrec_unjudged_titles.jsonl", [{"text": t, "task": "clustering"} for t in titles if keep(t)][:200])

    queries = [q["text"] for q in _jsonl(data_dir / "LegalSummarization" / "queries.jsonl") if len(q["text"]) > 20]
    _write("legal_queries.jsonl", [{"text": t[:MAX_CHARS], "task": "retrieval_query"} for t in queries if keep(t)][:200])
    corpus = [(d.get("title", "") + " " + d["text"]).strip()[:MAX_CHARS] for d in _jsonl(data_dir / "LegalSummarization" / "corpus.jsonl")]
    rng.shuffle(corpus)
    _write("legal_passages.jsonl", [{"text": t, "task": "retrieval_passage"} for t in corpus if keep(t)][:120])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent.parent / "shared" / "data")
