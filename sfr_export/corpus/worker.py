"""Embedding one unit: read and validate its rows, tokenize with the run's prompt, batch by token budget, embed,
write the shard. The local engine and every Ray actor run this same code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from ..runtime import Embedder
from ..tokenization import Truncation
from .config import InputType, UnitResult
from .errors import CorpusInputError
from .io import InputPlan, Unit, UnitReader, UnitRows
from .output import write_shard

# Test hook (fault injection): after this many units in one process, the process dies with os._exit(1) between
# embedding and writing a unit's shard, once per marker file. Only the tests set it.
CRASH_AFTER_ENV = "SFR_EXPORT_CORPUS_CRASH_AFTER_UNITS"
CRASH_MARKER_ENV = "SFR_EXPORT_CORPUS_CRASH_MARKER"


@dataclass(frozen=True)
class EmbedderOptions:
    """How each worker opens the artifact (resolved once by the driver so that every worker agrees)."""

    artifact: str
    backend: str
    variant: str | None
    truncation: Truncation
    batch_size: int
    batch_tokens: int
    verify: bool
    threads: int | None = None

    def open(self) -> Embedder:
        return Embedder.from_artifact(self.artifact, backend=self.backend, variant=self.variant, verify=self.verify,
                                      truncation=self.truncation, batch_size=self.batch_size,
                                      max_batch_tokens=self.batch_tokens, intra_op_threads=self.threads)


@dataclass(frozen=True)
class PromptOptions:
    input_type: InputType
    task: str | None

    def kwargs(self) -> dict[str, object]:
        """``Embedder.tokenize`` arguments: the same prompts as ``encode_documents`` / ``encode_queries``."""
        if self.input_type is InputType.QUERY:
            return {"prompt": self.task or "web_search", "side": "query"}
        return {"prompt": self.task, "side": "document"}


class UnitWorker:
    def __init__(self, embedder: Embedder, plan: InputPlan, prompt: PromptOptions, out: Path, dtype: str):
        self.embedder = embedder
        self.plan = plan
        self.prompt = prompt
        self.out = Path(out)
        self.dtype = dtype
        self.reader = UnitReader(plan)
        self.units_done = 0

    def run(self, unit: Unit) -> UnitResult:
        t0 = time.perf_counter()
        rows = self.reader.read(unit)
        ids = self._tokenize(rows)
        tokens = sum(len(s) for s in ids)
        emb = self.embedder.encode_ids(ids, check=False)
        _maybe_crash(self.units_done)
        shard = write_shard(self.out, unit.index, rows.ids, self.plan.id_kind, emb, self.dtype)
        self.units_done += 1
        return UnitResult(unit=unit.index, rows=unit.rows, tokens=tokens, seconds=time.perf_counter() - t0,
                          shard=shard.name, dim=int(emb.shape[1]))

    def _tokenize(self, rows: UnitRows) -> list[list[int]]:
        try:
            return self.embedder.tokenize(rows.texts, **self.prompt.kwargs()).ids
        except UserInputError:
            if self.embedder.tokenizer.truncation is not Truncation.ERROR:
                raise
        for text, where in zip(rows.texts, rows.where):  # find the over-long row to name it
            try:
                self.embedder.tokenize([text], **self.prompt.kwargs())
            except UserInputError as exc:
                raise CorpusInputError(f"{where}: text {str(exc).removeprefix('input 0 ')}") from None
        raise CorpusInputError(f"{rows.where[0]}..{rows.where[-1]}: failed to tokenize together but not one by one")


def _maybe_crash(units_done: int) -> None:
    after = os.environ.get(CRASH_AFTER_ENV)
    marker = os.environ.get(CRASH_MARKER_ENV)
    if after is None or marker is None or units_done < int(after):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first process to get here dies
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)
