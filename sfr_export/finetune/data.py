"""The fine-tuning data format (JSONL) and builders from the MTEB-format folders in ``../shared/data``.

One example per line::

    {"task": "STSBenchmark", "type": "sts", "instruction": "Retrieve semantically similar text.",
     "query": "A man is playing a guitar.", "positive": "A man plays the guitar.", "negatives": ["..."]}

``type`` is one of ``TASK_TYPES``. ``negatives`` may be empty (``sfr-export mine`` fills it). A task has one type.

Builders read train/dev splits only. The retrieval and clustering sources here ship only MTEB's test data (BEIR
``qrels/test.tsv``, the one ClusTREC file), so their builders carve a deterministic, seed-free *train* part (by a
hash of the query / document id) and leave the rest *held out* for evaluation; ``retrieval_split`` gives both parts.
Nothing is ever built from STSBenchmark or Banking77 test files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TrainingError
from ..jsonl import iter_objects, numbered_lines, parse_object
from ..artifact import atomic_path

log = logging.getLogger(__name__)

TASK_TYPES = ("retrieval", "sts", "classification", "clustering")
FIELDS = ("task", "type", "instruction", "query", "positive", "negatives")
ON_BAD_LINE = ("stop", "skip")
DATA_ENV = "SFR_EXPORT_DATA_DIR"


@dataclass(frozen=True)
class Example:
    task: str
    type: str
    instruction: str
    query: str
    positive: str
    negatives: tuple[str, ...] = ()

    def to_json(self) -> str:
        d = asdict(self)
        d["negatives"] = list(self.negatives)
        return json.dumps(d, ensure_ascii=False)

    def with_negatives(self, negatives: Sequence[str]) -> "Example":
        return Example(self.task, self.type, self.instruction, self.query, self.positive, tuple(negatives))


@dataclass
class LoadedData:
    examples: list[Example]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def check_task_type(value: object, where: str) -> str:
    if value not in TASK_TYPES:
        raise TrainingError(f"{where}: unknown task type {value!r} (expected one of {', '.join(TASK_TYPES)})")
    return str(value)


def parse_example(obj: object, where: str) -> Example:
    """Validate one decoded JSON object; every problem names ``where`` (file:line)."""
    if not isinstance(obj, dict):
        raise TrainingError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj and k != "negatives"]
    if missing:
        raise TrainingError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise TrainingError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for k in ("task", "query", "positive"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise TrainingError(f"{where}: field '{k}' must be a non-empty string")
    if not isinstance(obj["instruction"], str):
        raise TrainingError(f"{where}: field 'instruction' must be a string")
    typ = check_task_type(obj["type"], where)
    negs = obj.get("negatives", [])
    if not isinstance(negs, list) or not all(isinstance(n, str) and n.strip() for n in negs):
        raise TrainingError(f"{where}: field 'negatives' must be a list of non-empty strings")
    return Example(obj["task"], typ, obj["instruction"], obj["query"], obj["positive"], tuple(negs))


def read_jsonl(path: Path, *, on_bad_line: str = "stop") -> LoadedData:
    """Read training examples. A bad line raises (``stop``) or is logged with its number and skipped (``skip``)."""
    if on_bad_line not in ON_BAD_LINE:
        raise TrainingError(f"on_bad_line must be 'stop' or 'skip', got {on_bad_line!r}")
    path = Path(path)
    out = LoadedData([])
    task_types: dict[str, str] = {}
    for lineno, line in numbered_lines(path, TrainingError, "training data file"):
        where = f"{path}:{lineno}"
        try:
            ex = parse_example(parse_object(line, where, TrainingError), where)
            seen = task_types.setdefault(ex.task, ex.type)
            if seen != ex.type:
                raise TrainingError(f"{where}: task '{ex.task}' has type '{ex.type}' here but '{seen}' earlier")
        except TrainingError as exc:
            if on_bad_line == "stop":
                raise
            log.warning("skipping %s", exc)
            out.skipped.append((lineno, str(exc)))
            continue
        out.examples.append(ex)
    if not out.examples:
        raise TrainingError(f"{path} holds no valid training examples")
    return out


def write_jsonl(path: Path, examples: Iterable[Example]) -> int:
    n = 0
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for ex in examples:
                fh.write(ex.to_json() + "\n")
                n += 1
    return n


def read_corpus_file(path: Path) -> list[str]:
    """A corpus for mining: JSONL lines with ``text`` (and optional ``title``, BEIR style)."""
    texts = []
    for lineno, obj in iter_objects(Path(path), TrainingError, "corpus file"):
        if not isinstance(obj.get("text"), str):
            raise TrainingError(f"{path}:{lineno}: a corpus line needs a string field 'text'")
        texts.append(_doc_text(obj))
    return texts


def tasks_of(examples: Sequence[Example]) -> dict[str, list[int]]:
    """task -> indices of its examples, in first-seen order; every task has exactly one type."""
    out: dict[str, list[int]] = {}
    types: dict[str, str] = {}
    for i, ex in enumerate(examples):
        if types.setdefault(ex.task, ex.type) != ex.type:
            raise TrainingError(f"task '{ex.task}' mixes types '{types[ex.task]}' and '{ex.type}'")
        out.setdefault(ex.task, []).append(i)
    return out


# ------------------------------------------------------------------------------------------------------------------
# MTEB-format folders
# ------------------------------------------------------------------------------------------------------------------
def data_root() -> Path:
    """``$SFR_EXPORT_DATA_DIR``, else ``../shared/data`` beside the repository root."""
    env = os.environ.get(DATA_ENV)
    root = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not root.is_dir():
        raise TrainingError(f"MTEB data folder {root} not found: set {DATA_ENV} to the folder holding STSBenchmark/ etc.")
    return root


def _instruction(task: str) -> str:
    from ..spec import task_instructions

    table = task_instructions()
    if task not in table:
        raise TrainingError(f"task '{task}' is not in the instruction table (resources/instructions.toml)")
    return table[task].instruction


def _refuse_test(split: str, task: str) -> None:
    if split == "test":
        raise TrainingError(f"refusing to build training data from the test split of {task}")


def _heldout(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def _doc_text(obj: dict) -> str:
    title, text = str(obj.get("title") or "").strip(), str(obj.get("text") or "").strip()
    return f"{title} {text}".strip() if title else text


def _limit(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    rng = random.Random(seed)
    return sorted(rng.sample(examples, limit), key=examples.index)


def build_sts(folder: Path, *, task: str = "STSBenchmark", split: str = "dev", min_score: float = 4.0,
              limit: int | None = None, seed: int = 0) -> list[Example]:
    """STS pairs with a gold score >= ``min_score`` become (query, positive) pairs, both sides instructed."""
    _refuse_test(split, task)
    path = Path(folder) / f"stsb-en-{split}.csv"
    if not path.is_file():
        raise TrainingError(f"{path} not found (STS builder reads stsb-en-<split>.csv)")
    inst = _instruction(task)
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if len(row) != 3:
                raise TrainingError(f"{path}:{lineno}: expected 3 columns, got {len(row)}")
            if float(row[2]) >= min_score and row[0].strip() and row[1].strip():
                out.append(Example(task, "sts", inst, row[0].strip(), row[1].strip()))
    return _limit(out, limit, seed)


def build_classification(folder: Path, *, task: str = "Banking77Classification", split: str = "train",
                         negatives: int = 7, limit: int | None = None, seed: int = 0) -> list[Example]:
    """Text -> its label description as the positive document; other labels' descriptions as negatives."""
    _refuse_test(split, task)
    path = Path(folder) / f"{split}.csv"
    if not path.is_file():
        raise TrainingError(f"{path} not found")
    inst = _instruction(task)
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [(r["text"].strip(), r["category"].strip()) for r in csv.DictReader(fh)]
    labels = sorted({c for _, c in rows})
    rng = random.Random(seed)
    out = []
    for text, cat in rows:
        others = [label_description(c) for c in labels if c != cat]
        out.append(Example(task, "classification", inst, text, label_description(cat),
                           tuple(rng.sample(others, min(negatives, len(others))))))
    return _limit(out, limit, seed)


def label_description(label: str) -> str:
    return label.replace("_", " ").strip()


def build_clustering(folder: Path, *, task: str = "ClusTREC-Covid", negatives: int = 7, heldout_fraction: float = 0.3,
                     limit: int | None = None, seed: int = 0) -> list[Example]:
    """ClusTREC documents (title) -> their topic name; other topic names as negatives. Train part only."""
    path = Path(folder) / "clustrec_covid.jsonl"
    inst = _instruction(task)
    rows = [obj for _, obj in iter_objects(path, TrainingError)]
    topics = sorted({r["topic_name"] for r in rows})
    rng = random.Random(seed)
    out = []
    for r in rows:
        if _heldout(f"{task}:{r['doc_id']}", heldout_fraction) or not str(r.get("title") or "").strip():
            continue
        others = [t for t in topics if t != r["topic_name"]]
        out.append(Example(task, "clustering", inst, r["title"].strip(), r["topic_name"],
                           tuple(rng.sample(others, min(negatives, len(others))))))
    return _limit(out, limit, seed)


@dataclass
class RetrievalData:
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # query id -> text (only this part's queries)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: grade}, grades > 0 only


def retrieval_split(folder: Path, *, task: str, part: str = "train", heldout_fraction: float = 0.3) -> RetrievalData:
    """Read a BEIR folder. With ``qrels/train.tsv`` the train part is that file; otherwise the queries of
    ``qrels/test.tsv`` are split by a hash of their id into ``train`` and ``heldout`` parts."""
    folder = Path(folder)
    if part not in ("train", "heldout"):
        raise TrainingError(f"part must be 'train' or 'heldout', got {part!r}")
    corpus = {str(obj["_id"]): _doc_text(obj) for _, obj in iter_objects(folder / "corpus.jsonl", TrainingError)}
    queries = {str(obj["_id"]): str(obj["text"]).strip()
               for _, obj in iter_objects(folder / "queries.jsonl", TrainingError)}
    own_train = folder / "qrels" / "train.tsv"
    source = own_train if own_train.is_file() and part == "train" else folder / "qrels" / "test.tsv"
    carve = source.name == "test.tsv"
    qrels: dict[str, dict[str, int]] = {}
    with open(source, encoding="utf-8") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0] == "query-id" or int(row[2]) <= 0 or row[1] not in corpus:
                continue
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    if carve:
        keep = [q for q in qrels if _heldout(f"{task}:{q}", heldout_fraction) == (part == "heldout")]  # ordered
        if part == "train":  # a document relevant to any held-out query never becomes a training positive
            kept = set(keep)
            held_docs = {d for q, rel in qrels.items() if q not in kept for d in rel}
            qrels = {q: {d: g for d, g in qrels[q].items() if d not in held_docs} for q in keep}
        else:
            qrels = {q: qrels[q] for q in keep}
    qrels = {q: rel for q, rel in qrels.items() if rel and q in queries and queries[q]}
    return RetrievalData(corpus, {q: queries[q] for q in qrels}, qrels)


def build_retrieval(folder: Path, *, task: str, heldout_fraction: float = 0.3, limit: int | None = None,
                    seed: int = 0) -> tuple[list[Example], list[str]]:
    """BEIR query / relevant passage pairs of the train part; returns (examples, the corpus for mining)."""
    data = retrieval_split(folder, task=task, part="train", heldout_fraction=heldout_fraction)
    inst = _instruction(task)
    out = [Example(task, "retrieval", inst, data.queries[q], data.corpus[d])
           for q in data.qrels for d in data.qrels[q] if data.corpus[d]]
    return _limit(out, limit, seed), [t for t in data.corpus.values() if t]


# name -> builder kind; the folders of ../shared/data this module knows how to read.
KNOWN_SOURCES = {
    "STSBenchmark": "sts",
    "Banking77Classification": "classification",
    "ClusTREC-Covid": "clustering",
    "TRECCOVID": "retrieval",
    "LegalSummarization": "retrieval",
}


def build_task(name: str, *, root: Path | None = None, limit: int | None = None, negatives: int = 7,
               heldout_fraction: float = 0.3, seed: int = 0) -> tuple[list[Example], list[str] | None]:
    """Build one known task from its folder; returns (examples, mining corpus or None)."""
    if name not in KNOWN_SOURCES:
        raise TrainingError(f"no builder for '{name}' (known: {', '.join(KNOWN_SOURCES)})")
    folder = (root or data_root()) / name
    if not folder.is_dir():
        raise TrainingError(f"{folder} not found")
    kind = KNOWN_SOURCES[name]
    if kind == "sts":
        return build_sts(folder, task=name, limit=limit, seed=seed), None
    if kind == "classification":
        return build_classification(folder, task=name, negatives=negatives, limit=limit, seed=seed), None
    if kind == "clustering":
        return build_clustering(folder, task=name, negatives=negatives, heldout_fraction=heldout_fraction,
                                limit=limit, seed=seed), None
    return build_retrieval(folder, task=name, heldout_fraction=heldout_fraction, limit=limit, seed=seed)


def corpus_dir_for(jsonl: Path) -> Path:
    """Where the data builder puts mining corpora beside ``train.jsonl``: ``train.corpus/<task>.jsonl``."""
    jsonl = Path(jsonl)
    return jsonl.with_name(jsonl.stem + ".corpus")


def write_corpus(path: Path, texts: Sequence[str]) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def document_instruction(example: Example) -> str | None:
    """Documents get the instruction only for symmetric STS pairs (both sides are sentences of one kind);
    retrieval passages and label descriptions are embedded plain, as in e5-mistral / SFR training."""
    return example.instruction if example.type == "sts" and example.instruction else None


def assemble_corpora(jsonl: Path, items: Sequence[str], tasks: set[str]) -> dict[str, list[str]]:
    """Mining corpora: the builder's ``<jsonl>.corpus/<task>.jsonl`` files, then ``TASK=PATH`` items over them.

    Corpora of tasks that the examples do not use are dropped, unless an item named them explicitly (so that a
    typo surfaces as an error in mining instead of being ignored)."""
    corpora: dict[str, list[str]] = {}
    auto = corpus_dir_for(jsonl)
    if auto.is_dir():
        for p in sorted(auto.glob("*.jsonl")):
            corpora[p.stem] = read_corpus_file(p)
    named = set()
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise TrainingError(f"--corpus must look like TASK=PATH, got {item!r}")
        corpora[task] = read_corpus_file(Path(path))
        named.add(task)
    return {t: c for t, c in corpora.items() if t in tasks or t in named}
