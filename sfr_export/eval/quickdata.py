"""Rebuild the quick suite's shipped data (``eval/data/``) from the full MTEB folders in ``../shared/data``.

Each shipped folder is "the first N rows" (the quick suite's limits) of its source, written back in the source's
own format, so the same loaders read both and ``tests/eval`` can check the shipped files are exactly that subset.
Run: ``python -m sfr_export.eval.quickdata [SRC_DATA_DIR]``.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from .loaders import load_task
from .suite import PACKAGE_DATA_DIR, TaskEntry, default_data_dir, load_suite
from .tasks import ClassificationTask, ClusteringTask, EvalDataError, RetrievalTask, StsTask

# Files copied verbatim beside the subsets (licenses and provenance of the sources).
_COPIED = {"STSBenchmark": ["LICENSE.upstream.txt"], "ClusTREC-Covid": ["README.upstream.md"]}


def _write_csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path: Path, objs: list[dict]) -> None:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")


def write_subset(entry: TaskEntry, src: Path, dst: Path) -> None:
    task = load_task(src / entry.folder, entry.name, entry.format, entry.limits)
    out = dst / entry.folder
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(task, StsTask) and entry.format == "stsb-csv":
        _write_csv(out / "stsb-en-test.csv", [[a, b, repr(s)] for a, b, s in zip(task.sentences1, task.sentences2, task.scores)])
    elif isinstance(task, ClassificationTask) and entry.format == "labelled-csv":
        _write_csv(out / "train.csv", [list(r) for r in zip(task.train_texts, task.train_labels)], ["text", "category"])
        _write_csv(out / "test.csv", [list(r) for r in zip(task.test_texts, task.test_labels)], ["text", "category"])
    elif isinstance(task, RetrievalTask) and entry.format == "beir":
        in_corpus = set(task.corpus_ids)
        _write_jsonl(out / "corpus.jsonl", [{"_id": d, "title": "", "text": t} for d, t in zip(task.corpus_ids, task.corpus_texts)])
        _write_jsonl(out / "queries.jsonl", [{"_id": q, "text": t} for q, t in zip(task.query_ids, task.query_texts)])
        (out / "qrels").mkdir(exist_ok=True)
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q in task.query_ids
                                                  for d, g in task.qrels[q].items() if d in in_corpus]
        (out / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif isinstance(task, ClusteringTask) and entry.format == "clustrec-jsonl":
        want = Counter(zip(task.labels, task.texts))
        rows = []
        with open(src / entry.folder / "clustrec_covid.jsonl", encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                key = (str(obj["topic_id"]), f"{obj['title']} {obj.get('abstract') or ''}".strip())
                if want[key] > 0:
                    want[key] -= 1
                    rows.append(obj)
        _write_jsonl(out / "clustrec_covid.jsonl", rows)
    else:
        raise EvalDataError(f"no subset writer for task {entry.name} (format {entry.format})")
    for name in _COPIED.get(entry.folder, []):
        shutil.copyfile(src / entry.folder / name, out / name)


def build_quick_data(src: Path, dst: Path = PACKAGE_DATA_DIR) -> None:
    for entry in load_suite("quick").tasks:
        write_subset(entry, Path(src), Path(dst))


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    build_quick_data(Path(sys.argv[1]) if len(sys.argv) > 1 else default_data_dir())
