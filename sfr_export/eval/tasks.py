"""Task data for fidelity verification: one small dataclass per MTEB task type, plus ``TextGroup``.

A task says which texts must be embedded (``groups()``, each with the prompt *side*: queries get the task's
instruction, retrieval documents do not) and holds the gold labels its evaluator scores against. Loading from the
MTEB-format folders lives in ``loaders.py``; scoring lives in one module per type (``sts.py``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserInputError

TASK_TYPES = ("sts", "classification", "retrieval", "clustering", "pair_classification")


class EvalDataError(UserInputError):
    """A verification data folder is missing, malformed, or names an unknown task type."""


def check_task_type(task_type: str, *, where: str = "") -> str:
    if task_type not in TASK_TYPES:
        at = f" in {where}" if where else ""
        raise EvalDataError(f"unknown task type '{task_type}'{at}: expected one of {', '.join(TASK_TYPES)}")
    return task_type


@dataclass(frozen=True)
class TextGroup:
    """Texts embedded together with one prompt side. ``key`` names the group inside its task."""

    key: str
    texts: tuple[str, ...]
    side: str  # "query" (gets the task instruction) | "document" (asymmetric tasks' passages: no instruction)


@dataclass(frozen=True)
class StsTask:
    name: str
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: tuple[float, ...]
    min_score: float = 0.0
    max_score: float = 5.0
    type: str = field(default="sts", init=False)

    def groups(self) -> list[TextGroup]:
        return [TextGroup("sentences1", self.sentences1, "query"), TextGroup("sentences2", self.sentences2, "query")]

    @property
    def size(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class PairClassificationTask:
    name: str
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    labels: tuple[int, ...]  # 1 = paraphrase / similar, 0 = not
    type: str = field(default="pair_classification", init=False)

    def groups(self) -> list[TextGroup]:
        return [TextGroup("sentences1", self.sentences1, "query"), TextGroup("sentences2", self.sentences2, "query")]

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassificationTask:
    name: str
    train_texts: tuple[str, ...]
    train_labels: tuple[str, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[str, ...]
    # Training rows of each experiment, as positions in train_*; None = derive them with MTEB's undersampling.
    experiments: tuple[tuple[int, ...], ...] | None = None
    type: str = field(default="classification", init=False)

    def groups(self) -> list[TextGroup]:
        return [TextGroup("train", self.train_texts, "query"), TextGroup("test", self.test_texts, "query")]

    @property
    def size(self) -> int:
        return len(self.test_labels)


@dataclass(frozen=True)
class ClusteringTask:
    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    type: str = field(default="clustering", init=False)

    def groups(self) -> list[TextGroup]:
        return [TextGroup("texts", self.texts, "query")]

    @property
    def size(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class RetrievalTask:
    """BEIR-style retrieval: ``corpus`` doc id -> text (title and text joined as MTEB does), ``queries`` query id ->
    text, ``qrels`` query id -> {doc id: graded relevance}."""

    name: str
    corpus_ids: tuple[str, ...]
    corpus_texts: tuple[str, ...]
    query_ids: tuple[str, ...]
    query_texts: tuple[str, ...]
    qrels: dict[str, dict[str, int]]
    type: str = field(default="retrieval", init=False)

    def groups(self) -> list[TextGroup]:
        return [TextGroup("queries", self.query_texts, "query"), TextGroup("corpus", self.corpus_texts, "document")]

    @property
    def size(self) -> int:
        return len(self.query_ids)


Task = StsTask | PairClassificationTask | ClassificationTask | ClusteringTask | RetrievalTask


def validate_task(task: Task) -> Task:
    """Refuse tasks an evaluator cannot score (empty, mismatched lengths, single class)."""
    if task.size == 0:
        raise EvalDataError(f"task {task.name} has no rows after loading")
    for g in task.groups():
        if not g.texts:
            raise EvalDataError(f"task {task.name} has an empty '{g.key}' text group")
        for i, t in enumerate(g.texts):
            if not t.strip():
                raise EvalDataError(f"task {task.name}: '{g.key}' row {i} is an empty text")
    if isinstance(task, (StsTask, PairClassificationTask)):
        gold = task.scores if isinstance(task, StsTask) else task.labels
        if not len(task.sentences1) == len(task.sentences2) == len(gold):
            raise EvalDataError(f"task {task.name}: sentence and gold columns differ in length")
        if len(set(gold)) < 2:
            raise EvalDataError(f"task {task.name}: the gold column has a single value; nothing to correlate")
    if isinstance(task, ClassificationTask):
        if len(task.train_texts) != len(task.train_labels) or len(task.test_texts) != len(task.test_labels):
            raise EvalDataError(f"task {task.name}: texts and labels differ in length")
        if len(set(task.train_labels)) < 2:
            raise EvalDataError(f"task {task.name}: the training split has fewer than 2 labels")
    if isinstance(task, ClusteringTask) and len(set(task.labels)) < 2:
        raise EvalDataError(f"task {task.name}: fewer than 2 clusters")
    if isinstance(task, RetrievalTask):
        missing = [q for q in task.query_ids if q not in task.qrels]
        if missing:
            raise EvalDataError(f"task {task.name}: queries without qrels: {missing[:5]}")
    return task
