"""Output side of ``embed-corpus``: atomic Parquet shards, the run record ``_corpus.json`` and ``_SUCCESS``.

Layout of an output dir::

    part-00000000.parquet ...   one shard per unit: ``id`` + ``embedding`` (fixed-size list of float32/float16)
    _corpus.json                what produced the shards (model fingerprint, variant, prompt, dtype, input, counts)
    _SUCCESS                    written last, when every unit has its shard

Shards are written to a hidden temp file and renamed into place, so a shard under its final name is complete.
Names starting with ``_`` or ``.`` are skipped by pyarrow, pandas and Ray Data, so ``pq.read_table(OUT)`` reads
only the shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._optional import require
from ..artifact import atomic_write_text
from .errors import CorpusOutputError, CorpusShardError
from .io import IdKind, InputPlan

RECORD_NAME = "_corpus.json"
SUCCESS_NAME = "_SUCCESS"
RECORD_FORMAT = "sfr-export-corpus/1"
SHARD_RE = re.compile(r"^part-(\d{8})\.parquet$")


def shard_name(unit: int) -> str:
    return f"part-{unit:08d}.parquet"


@dataclass(frozen=True)
class RunIdentity:
    """What must match for shards of two runs to be mixed in one output."""

    model_id: str
    model_fingerprint: str
    backend: str
    variant: str
    spec: str  # the artifact's spec.json, canonical JSON
    input_type: str
    task: str | None
    prompt_template: str  # how a text "{text}" is formatted before tokenizing
    dtype: str
    truncation: str
    input_signature: str  # files, row counts, columns, chunk rows


@dataclass
class CorpusRecord:
    """The content of ``_corpus.json``."""

    identity: RunIdentity
    artifact: str
    input: str
    files: int
    rows_total: int
    shards_total: int
    id_column: str
    text_column: str
    chunk_rows: int
    format: str = RECORD_FORMAT
    status: str = "running"  # running | complete
    dim: int | None = None
    engine: str = ""
    rows_embedded_last_run: int = 0
    wall_seconds_last_run: float = 0.0
    created: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: Path) -> "CorpusRecord":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["identity"] = RunIdentity(**raw["identity"])
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorpusOutputError(f"{path} is not an sfr-export corpus record ({exc})") from None


def prepare_output(out: Path, record: CorpusRecord, *, resume: bool) -> CorpusRecord | None:
    """Check ``out`` against ``record``. Returns the stored record when ``out`` already has one (same identity)."""
    path = out / RECORD_NAME
    if not path.is_file():
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise CorpusOutputError(f"output dir {out} is not empty and holds no {RECORD_NAME}: choose an empty or new dir")
        return None
    old = CorpusRecord.from_json(path)
    if old.format != RECORD_FORMAT:
        raise CorpusOutputError(f"{path} has format {old.format!r}, this version writes {RECORD_FORMAT!r}")
    diffs = [f"{f.name}: output has {getattr(old.identity, f.name)!r}, this run {getattr(record.identity, f.name)!r}"
             for f in dataclasses.fields(RunIdentity)
             if getattr(old.identity, f.name) != getattr(record.identity, f.name)]
    if diffs:
        what = "; ".join(d if not d.startswith(("spec:", "input_signature:")) else d.split(":")[0] + " differs"
                         for d in diffs)
        raise CorpusOutputError(f"output dir {out} was written by another run ({what}): choose another --output")
    if not resume and not (out / SUCCESS_NAME).is_file():
        raise CorpusOutputError(f"output dir {out} holds a partial run: pass --resume to finish it, or choose another --output")
    return old


def write_record(out: Path, record: CorpusRecord) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECORD_NAME, record.to_json())


def write_success(out: Path, record: CorpusRecord) -> None:
    atomic_write_text(out / SUCCESS_NAME, json.dumps({"rows": record.rows_total, "shards": record.shards_total,
                                                      "dim": record.dim, "finished": record.finished}) + "\n")


def is_complete(out: Path) -> bool:
    return (out / SUCCESS_NAME).is_file()


def clean_temp_files(out: Path) -> int:
    """Remove temp shards left by a crashed run (never taken as complete: they lack the final name)."""
    n = 0
    for p in out.glob(".part-*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def done_units(out: Path, plan: InputPlan) -> set[int]:
    """Units whose shard is in place, each checked against the row count the plan expects."""
    pq = require("pyarrow.parquet", purpose="embed-corpus")
    done: set[int] = set()
    if not out.is_dir():
        return done
    for p in out.iterdir():
        m = SHARD_RE.match(p.name)
        if not m:
            continue
        unit = int(m.group(1))
        if unit >= len(plan.units):
            raise CorpusShardError(f"shard {p} is beyond this input's {len(plan.units)} units")
        rows = pq.ParquetFile(p).metadata.num_rows
        if rows != plan.units[unit].rows:
            raise CorpusShardError(f"shard {p} holds {rows} rows, the input's unit {unit} has {plan.units[unit].rows}")
        done.add(unit)
    return done


def write_shard(out: Path, unit: int, ids: list, id_kind: IdKind, emb: np.ndarray, dtype: str) -> Path:
    """Write one shard atomically: a hidden temp file, fsync, then rename to ``part-UNIT.parquet``."""
    pa = require("pyarrow", purpose="embed-corpus")
    pq = require("pyarrow.parquet", purpose="embed-corpus")
    values = np.ascontiguousarray(emb, dtype=np.float16 if dtype == "float16" else np.float32)
    flat = pa.array(values.reshape(-1))
    table = pa.table({"id": pa.array(ids, type=pa.string() if id_kind is IdKind.STRING else pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, values.shape[1])})
    final = out / shard_name(unit)
    tmp = out / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
