"""Readers for the MTEB-format task folders in ``../shared/data`` (and the subsets shipped in the package).

Each folder's ``SOURCE.md`` documents its format; one reader per format. Subsetting is deterministic ("the first N
in file order") so a suite's limits select the same rows from the full folder as from the shipped subset.
Every problem is an ``EvalDataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..jsonl import iter_objects
from .tasks import (ClassificationTask, ClusteringTask, EvalDataError, PairClassificationTask, RetrievalTask,
                    StsTask, Task, validate_task)


@dataclass(frozen=True)
class Limits:
    """Deterministic subsetting (first N in file order). ``None`` = no limit."""

    max_pairs: int | None = None  # sts, pair_classification
    max_train_per_label: int | None = None  # classification
    max_test_per_label: int | None = None  # classification
    max_queries: int | None = None  # retrieval: first N queries that have a relevant document
    max_corpus: int | None = None  # retrieval: relevant docs of the kept queries first, then distractors in file order
    max_labels: int | None = None  # clustering: first K labels by first appearance
    max_per_label: int | None = None  # clustering

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise EvalDataError(f"limit {name} must be a positive integer, got {value!r}")


def _need_file(path: Path) -> Path:
    if not path.is_file():
        raise EvalDataError(f"missing data file {path}")
    return path


def _need_dir(path: Path) -> Path:
    if not path.is_dir():
        raise EvalDataError(f"missing data folder {path}")
    return path


def _float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise EvalDataError(f"{where}: '{value}' is not a number") from exc


def _take(n: int | None) -> int:
    return n if n is not None else 1 << 62


# ---- STS -------------------------------------------------------------------------------------------------------
def load_stsb_csv(folder: Path, name: str, limits: Limits) -> StsTask:
    """STSBenchmark: ``stsb-en-test.csv``, Excel-dialect CSV without header: sentence1, sentence2, score (0-5)."""
    path = _need_file(_need_dir(folder) / "stsb-en-test.csv")
    s1: list[str] = []
    s2: list[str] = []
    gold: list[float] = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if len(gold) >= _take(limits.max_pairs):
                break
            if len(row) != 3:
                raise EvalDataError(f"{path}:{line_no}: expected 3 CSV fields (sentence1, sentence2, score), got {len(row)}")
            s1.append(row[0])
            s2.append(row[1])
            gold.append(_float(row[2], f"{path}:{line_no}"))
    return StsTask(name, tuple(s1), tuple(s2), tuple(gold), 0.0, 5.0)


def load_semeval_sts(folder: Path, name: str, limits: Limits) -> StsTask:
    """STS13-16: every ``*.test.tsv`` (sorted by name), no header: score<TAB>sentence1<TAB>sentence2.
    Rows with an empty score are unscored input pairs and are skipped (the gold set is the scored rows)."""
    files = sorted(_need_dir(folder).glob("*.test.tsv"))
    if not files:
        raise EvalDataError(f"no *.test.tsv files in {folder}")
    s1: list[str] = []
    s2: list[str] = []
    gold: list[float] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if len(gold) >= _take(limits.max_pairs):
                    break
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 3:
                    raise EvalDataError(f"{path}:{line_no}: expected score<TAB>sentence1<TAB>sentence2")
                if not parts[0].strip():
                    continue
                gold.append(_float(parts[0], f"{path}:{line_no}"))
                s1.append(parts[1])
                s2.append(parts[2])
    return StsTask(name, tuple(s1), tuple(s2), tuple(gold), 0.0, 5.0)


def load_biosses(folder: Path, name: str, limits: Limits) -> StsTask:
    """BIOSSES: ``biosses.tsv`` with header id, sentence1, sentence2, annotator_A..E, score_mean. The gold score is
    the mean of the five annotators (as in MTEB), on a 0-4 scale."""
    path = _need_file(_need_dir(folder) / "biosses.tsv")
    s1: list[str] = []
    s2: list[str] = []
    gold: list[float] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        annot = [c for c in (reader.fieldnames or []) if c.startswith("annotator_")]
        if not {"sentence1", "sentence2"} <= set(reader.fieldnames or []) or not annot:
            raise EvalDataError(f"{path}: header must name sentence1, sentence2 and annotator_* columns")
        for line_no, row in enumerate(reader, 2):
            if len(gold) >= _take(limits.max_pairs):
                break
            vals = [_float(row[c] or "", f"{path}:{line_no}") for c in annot]
            s1.append(row["sentence1"])
            s2.append(row["sentence2"])
            gold.append(sum(vals) / len(vals))
    return StsTask(name, tuple(s1), tuple(s2), tuple(gold), 0.0, 4.0)


# ---- pair classification ---------------------------------------------------------------------------------------
_VOTES = re.compile(r"^\((\d+),\s*(\d+)\)$")


def load_twitter_url(folder: Path, name: str, limits: Limits) -> PairClassificationTask:
    """TwitterURLCorpus test file: sentence1<TAB>sentence2<TAB>(n,6)<TAB>url, CRLF, blank lines. Label rule from
    the corpus README (also MTEB's): n>=4 -> 1, n<=2 -> 0, n==3 dropped."""
    files = sorted(_need_dir(folder).glob("*.txt"))
    if not files:
        raise EvalDataError(f"no .txt file in {folder}")
    s1: list[str] = []
    s2: list[str] = []
    labels: list[int] = []
    path = files[0]
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, line in enumerate(f, 1):
            if len(labels) >= _take(limits.max_pairs):
                break
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            votes = next((m for p in parts[2:] if (m := _VOTES.match(p.strip()))), None)
            if len(parts) < 3 or votes is None:
                raise EvalDataError(f"{path}:{line_no}: expected sentence1<TAB>sentence2<TAB>(n,6)")
            n = int(votes.group(1))
            if n == 3:
                continue
            s1.append(parts[0])
            s2.append(parts[1])
            labels.append(1 if n >= 4 else 0)
    return PairClassificationTask(name, tuple(s1), tuple(s2), tuple(labels))


# ---- classification --------------------------------------------------------------------------------------------
def _labelled_csv(path: Path, per_label: int | None) -> tuple[list[str], list[str]]:
    texts: list[str] = []
    labels: list[str] = []
    seen: dict[str, int] = defaultdict(int)
    with open(_need_file(path), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"text", "category"} <= set(reader.fieldnames or []):
            raise EvalDataError(f"{path}: header must be text,category")
        for line_no, row in enumerate(reader, 2):
            text, label = row.get("text"), row.get("category")
            if text is None or label is None or not label.strip():
                raise EvalDataError(f"{path}:{line_no}: row needs a text and a category")
            if seen[label] >= _take(per_label):
                continue
            seen[label] += 1
            texts.append(text)
            labels.append(label)
    return texts, labels


def load_banking77(folder: Path, name: str, limits: Limits) -> ClassificationTask:
    """Banking77: ``train.csv`` and ``test.csv`` with header text,category (77 intents)."""
    folder = _need_dir(folder)
    tr_x, tr_y = _labelled_csv(folder / "train.csv", limits.max_train_per_label)
    te_x, te_y = _labelled_csv(folder / "test.csv", limits.max_test_per_label)
    return ClassificationTask(name, tuple(tr_x), tuple(tr_y), tuple(te_x), tuple(te_y))


# ---- clustering ------------------------------------------------------------------------------------------------
def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    return iter_objects(_need_file(path), EvalDataError)


def load_clustrec(folder: Path, name: str, limits: Limits) -> ClusteringTask:
    """ClusTREC-Covid: ``clustrec_covid.jsonl`` rows {topic_id, title, abstract, ...}; the text is title and
    abstract joined by a space (MTEB's "title and abstract" subset), the label is ``topic_id``."""
    path = _need_dir(folder) / "clustrec_covid.jsonl"
    order: list[str] = []
    per: dict[str, int] = defaultdict(int)
    texts: list[str] = []
    labels: list[str] = []
    for line_no, obj in _jsonl(path):
        if "topic_id" not in obj or "title" not in obj:
            raise EvalDataError(f"{path}:{line_no}: row needs topic_id and title")
        label = str(obj["topic_id"])
        if label not in per:
            if len(order) >= _take(limits.max_labels):
                continue
            order.append(label)
        if per[label] >= _take(limits.max_per_label):
            continue
        text = f"{obj['title']} {obj.get('abstract') or ''}".strip()
        if not text:
            continue
        per[label] += 1
        texts.append(text)
        labels.append(label)
    return ClusteringTask(name, tuple(texts), tuple(labels))


# ---- retrieval (BEIR) ------------------------------------------------------------------------------------------
def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV: header ``query-id corpus-id score`` then one ``qid<TAB>did<TAB>int`` per line."""
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(_need_file(path), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if line_no == 1 and parts and parts[0] == "query-id":
                continue
            if len(parts) != 3:
                raise EvalDataError(f"{path}:{line_no}: bad qrels line {line[:80]!r}: expected query-id<TAB>corpus-id<TAB>score")
            try:
                grade = int(parts[2])
            except ValueError as exc:
                raise EvalDataError(f"{path}:{line_no}: bad qrels line {line[:80]!r}: score '{parts[2]}' is not an integer") from exc
            qrels[parts[0]][parts[1]] = grade
    if not qrels:
        raise EvalDataError(f"{path} holds no qrels")
    return dict(qrels)


def load_beir(folder: Path, name: str, limits: Limits) -> RetrievalTask:
    """BEIR folder: ``corpus.jsonl`` {_id, title, text}, ``queries.jsonl`` {_id, text}, ``qrels/test.tsv``.
    A document's text is ``(title + " " + text).strip()`` as in mteb's ``_create_dataloaders``."""
    folder = _need_dir(folder)
    qrels_all = read_qrels(folder / "qrels" / "test.tsv")
    queries: list[tuple[str, str]] = []
    for line_no, obj in _jsonl(folder / "queries.jsonl"):
        if "_id" not in obj or "text" not in obj:
            raise EvalDataError(f"{folder / 'queries.jsonl'}:{line_no}: query needs _id and text")
        qid = str(obj["_id"])
        if any(g > 0 for g in qrels_all.get(qid, {}).values()) and len(queries) < _take(limits.max_queries):
            queries.append((qid, str(obj["text"])))
    if not queries:
        raise EvalDataError(f"{folder}: no query has a relevant document in qrels/test.tsv")
    keep_q = {q for q, _ in queries}
    qrels = {q: qrels_all[q] for q in keep_q}
    relevant = {d for q in keep_q for d, g in qrels[q].items() if g > 0}
    docs: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    for line_no, obj in _jsonl(folder / "corpus.jsonl"):
        if "_id" not in obj or "text" not in obj:
            raise EvalDataError(f"{folder / 'corpus.jsonl'}:{line_no}: document needs _id and text")
        did = str(obj["_id"])
        title = str(obj.get("title") or "")
        text = f"{title} {obj['text']}".strip() if title else str(obj["text"]).strip()
        if not text:
            continue
        (docs if did in relevant else others).append((did, text))
    room = _take(limits.max_corpus) - len(docs)
    docs += others[:max(room, 0)]
    if not docs:
        raise EvalDataError(f"{folder}/corpus.jsonl holds no documents")
    return RetrievalTask(name, tuple(d for d, _ in docs), tuple(t for _, t in docs), tuple(q for q, _ in queries),
                         tuple(t for _, t in queries), qrels)


LOADERS: dict[str, Callable[[Path, str, Limits], Task]] = {
    "stsb-csv": load_stsb_csv,
    "semeval-sts-tsv": load_semeval_sts,
    "biosses-tsv": load_biosses,
    "twitter-url-tsv": load_twitter_url,
    "labelled-csv": load_banking77,
    "clustrec-jsonl": load_clustrec,
    "beir": load_beir,
}

# The MTEB task folders in ../shared/data and the format each one is in.
DEFAULT_FORMATS: dict[str, str] = {
    "STSBenchmark": "stsb-csv",
    "STS13": "semeval-sts-tsv",
    "STS14": "semeval-sts-tsv",
    "STS15": "semeval-sts-tsv",
    "STS16": "semeval-sts-tsv",
    "BIOSSES": "biosses-tsv",
    "TwitterURLCorpus": "twitter-url-tsv",
    "Banking77Classification": "labelled-csv",
    "ClusTREC-Covid": "clustrec-jsonl",
    "TRECCOVID": "beir",
    "LegalSummarization": "beir",
}


def load_task(folder: Path, name: str, fmt: str, limits: Limits = Limits()) -> Task:
    """Read one task folder with the reader for ``fmt``, apply ``limits`` and validate the result."""
    if fmt not in LOADERS:
        raise EvalDataError(f"task {name}: unknown data format '{fmt}' (known: {', '.join(sorted(LOADERS))})")
    try:
        task = LOADERS[fmt](Path(folder), name, limits)
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"task {name}: {folder} holds a file that is not UTF-8 ({exc.reason})") from exc
    except csv.Error as exc:
        raise EvalDataError(f"task {name}: malformed CSV/TSV in {folder}: {exc}") from exc
    return validate_task(task)
