"""Typed options of one ``embed-corpus`` run, and the summary it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifact.enums import Backend, Variant
from ..choice import Choice
from ..errors import UserInputError
from ..tokenization import Truncation


class InputType(Choice, label="input type"):
    DOCUMENT = "document"
    QUERY = "query"


class OutputDtype(Choice, label="output dtype"):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


class EngineKind(Choice, label="engine"):
    LOCAL = "local"
    RAY = "ray"


@dataclass(frozen=True)
class CorpusConfig:
    """Everything ``embed_corpus`` needs. ``chunk_rows`` rows make one unit of work and one output shard."""

    artifact: Path
    input: str  # a file, a directory of files, or a glob
    output: Path
    id_column: str = "id"
    text_column: str = "text"
    input_type: InputType = InputType.DOCUMENT
    task: str | None = None
    variant: Variant | None = None  # None: the best variant the artifact has here
    backend: Backend = Backend.AUTO
    dtype: OutputDtype = OutputDtype.FLOAT32
    batch_tokens: int = 16384
    batch_size: int = 64
    chunk_rows: int = 4096
    engine: EngineKind = EngineKind.LOCAL
    ray_address: str | None = None
    workers: int | None = None  # Ray actors (default: one per GPU, else CPUs // threads_per_worker)
    threads_per_worker: int | None = None  # ORT intra-op threads per Ray actor (default: CPUs // workers)
    resume: bool = True
    truncation: Truncation = Truncation.TRUNCATE
    allow_duplicate_ids: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        for name, kind in (("backend", Backend), ("input_type", InputType), ("dtype", OutputDtype),
                           ("engine", EngineKind), ("truncation", Truncation)):
            object.__setattr__(self, name, kind.parse(getattr(self, name)))
        if self.variant is not None:
            object.__setattr__(self, "variant", Variant.parse(self.variant))
        for name in ("batch_tokens", "batch_size", "chunk_rows"):
            if getattr(self, name) < 1:
                raise UserInputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise UserInputError(f"--workers must be >= 1, got {self.workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise UserInputError(f"threads per worker must be >= 1, got {self.threads_per_worker}")
        if self.ray_address is not None and self.engine is not EngineKind.RAY:
            raise UserInputError("--ray-address needs --engine ray")
        if self.id_column == self.text_column:
            raise UserInputError(f"--id-column and --text-column are both '{self.id_column}'")


@dataclass(frozen=True)
class UnitResult:
    """What embedding one unit (one output shard) did."""

    unit: int
    rows: int
    tokens: int
    seconds: float
    shard: str
    dim: int


@dataclass
class CorpusSummary:
    """The result of ``embed_corpus``: what was embedded now, what was already there, and where it went."""

    output: Path
    engine: str
    rows_total: int
    rows_embedded: int  # in this run
    rows_skipped: int  # already in complete shards (resume)
    shards_total: int
    shards_written: int
    tokens: int  # real tokens embedded in this run
    wall_seconds: float
    already_complete: bool = False
    dim: int | None = None
    record_path: Path | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows_embedded / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0
