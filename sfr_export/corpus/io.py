"""Input side of ``embed-corpus``: find the files, plan units of work, read one unit's rows with validation.

A *unit* is ``chunk_rows`` consecutive rows of one file (the last one of a file may be shorter). Units are the grain
of resume and of the output: unit ``k`` becomes shard ``part-k.parquet``. They depend only on the files, their row
counts and ``chunk_rows``, so a re-run plans the same units. Rows are named ``path:LINE`` (JSONL, 1-based lines) or
``path row N`` (Parquet, 0-based rows) in every error.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..choice import Choice
from .._optional import require
from .errors import CorpusInputError

GLOB_CHARS = frozenset("*?[")


class InputFormat(Choice):
    PARQUET = "parquet"
    JSONL = "jsonl"


SUFFIXES = {".parquet": InputFormat.PARQUET, ".pq": InputFormat.PARQUET,
            ".jsonl": InputFormat.JSONL, ".ndjson": InputFormat.JSONL}


class IdKind(Choice):
    STRING = "string"
    INT = "int64"


@dataclass(frozen=True)
class InputFile:
    path: str
    format: InputFormat
    rows: int


@dataclass(frozen=True)
class Unit:
    index: int
    file: int  # index into InputPlan.files
    start: int  # first row (0-based, non-blank JSONL lines count as rows)
    stop: int
    byte_offset: int = 0  # JSONL: where the unit's first line starts
    first_line: int = 0  # JSONL: 1-based line number of that line

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class InputPlan:
    files: tuple[InputFile, ...]
    units: tuple[Unit, ...]
    id_column: str
    text_column: str
    id_kind: IdKind
    chunk_rows: int

    @property
    def rows_total(self) -> int:
        return sum(f.rows for f in self.files)

    def signature(self) -> str:
        """Stable across runs over the same files: the paths, row counts, columns and unit size."""
        key = json.dumps([[f.path, f.format.value, f.rows] for f in self.files]
                         + [self.id_column, self.text_column, self.chunk_rows], separators=(",", ":"))
        return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class UnitRows:
    ids: list[str] | list[int]
    texts: list[str]
    where: list[str]  # "path:LINE" or "path row N" of each row, for errors found after reading


# ---- discovery -----------------------------------------------------------------------------------------------
def find_files(spec: str) -> list[tuple[Path, InputFormat]]:
    """A file, a directory (its non-hidden files, recursively) or a glob -> sorted files with their formats."""
    if any(c in spec for c in GLOB_CHARS):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CorpusInputError(f"input glob {spec} matches no file")
    elif Path(spec).is_dir():
        root = Path(spec)
        paths = sorted(p for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))
        if not paths:
            raise CorpusInputError(f"input dir {spec} holds no file")
    elif Path(spec).is_file():
        paths = [Path(spec)]
    else:
        raise CorpusInputError(f"input {spec} does not exist")
    out = []
    for p in paths:
        fmt = SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise CorpusInputError(f"{p}: unknown input format '{p.suffix or '(no suffix)'}' "
                                   f"(expected {', '.join(sorted(SUFFIXES))})")
        out.append((p, fmt))
    return out


def plan_input(spec: str, *, id_column: str, text_column: str, chunk_rows: int) -> InputPlan:
    """Count rows, check the columns and cut the input into units (no text is validated here)."""
    files: list[InputFile] = []
    units: list[Unit] = []
    kinds: set[IdKind] = set()
    for fi, (path, fmt) in enumerate(find_files(spec)):
        if fmt is InputFormat.PARQUET:
            rows, kind = _parquet_meta(path, id_column, text_column)
            spans = [(s, min(s + chunk_rows, rows), 0, 0) for s in range(0, rows, chunk_rows)]
        else:
            rows, kind, spans = _jsonl_meta(path, id_column, chunk_rows)
        if kind is not None:
            kinds.add(kind)
        files.append(InputFile(str(path.resolve()), fmt, rows))
        base = len(units)
        units.extend(Unit(base + k, fi, s, e, off, line) for k, (s, e, off, line) in enumerate(spans))
    if len(kinds) > 1:
        raise CorpusInputError(f"id column '{id_column}' is a string in some files and an integer in others: "
                               "use one type across the corpus")
    if not units:
        raise CorpusInputError(f"input {spec} has zero rows")
    return InputPlan(tuple(files), tuple(units), id_column, text_column, kinds.pop(), chunk_rows)


def _parquet_meta(path: Path, id_column: str, text_column: str) -> tuple[int, IdKind | None]:
    pa = require("pyarrow", purpose="embed-corpus")
    pf = _open_parquet(path)
    schema = pf.schema_arrow
    for col in (id_column, text_column):
        found = len(schema.get_all_field_indices(col))
        if found == 0:
            raise CorpusInputError(f"{path}: no column '{col}' (columns: {', '.join(schema.names)})")
        if found > 1:
            raise CorpusInputError(f"{path}: column '{col}' appears {found} times")
    id_type = schema.field(id_column).type
    if pa.types.is_integer(id_type):
        kind = IdKind.INT
    elif pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
        kind = IdKind.STRING
    else:
        raise CorpusInputError(f"{path}: id column '{id_column}' has type {id_type} (expected a string or an integer)")
    if not (pa.types.is_string(schema.field(text_column).type) or pa.types.is_large_string(schema.field(text_column).type)):
        raise CorpusInputError(f"{path}: text column '{text_column}' has type {schema.field(text_column).type}, "
                               "not string")
    rows = pf.metadata.num_rows
    return rows, (kind if rows else None)


def _open_parquet(path: Path):  # -> pyarrow.parquet.ParquetFile
    pq = require("pyarrow.parquet", purpose="embed-corpus")
    pa = require("pyarrow", purpose="embed-corpus")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusInputError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0]})") from None


def _jsonl_meta(path: Path, id_column: str, chunk_rows: int) -> tuple[int, IdKind | None, list[tuple[int, int, int, int]]]:
    """Row count, the id kind of the first row and unit spans (start, stop, byte offset, first line number)."""
    spans: list[tuple[int, int, int, int]] = []
    rows, offset, kind = 0, 0, None
    try:
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    if rows % chunk_rows == 0:
                        spans.append((rows, rows, offset, line_no))
                    if kind is None:
                        kind = _id_kind(_parse_line(line, path, line_no), path, line_no, id_column)
                    rows += 1
                offset += len(line)
    except OSError as exc:
        raise CorpusInputError(f"{path}: unreadable ({exc.strerror})") from None
    spans = [(s, min(s + chunk_rows, rows), off, ln) for s, _, off, ln in spans]
    return rows, kind, spans


def _parse_line(line: bytes, path: Path, line_no: int) -> dict:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusInputError(f"{path}:{line_no}: malformed JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorpusInputError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _id_kind(obj: dict, path: Path, line_no: int, id_column: str) -> IdKind:
    if id_column not in obj:
        raise CorpusInputError(f"{path}:{line_no}: no id column '{id_column}' (keys: {', '.join(obj) or 'none'})")
    value = obj[id_column]
    if isinstance(value, str):
        return IdKind.STRING
    if isinstance(value, int) and not isinstance(value, bool):
        return IdKind.INT
    raise CorpusInputError(f"{path}:{line_no}: id '{id_column}' is {type(value).__name__} {value!r}, "
                           "not a string or an integer")


# ---- reading -------------------------------------------------------------------------------------------------
class UnitReader:
    """Reads the rows of one unit at a time, keeping the last Parquet row group read so that consecutive units
    of one row group decode it once. Memory: one row group of the id and text columns."""

    def __init__(self, plan: InputPlan):
        self.plan = plan
        self._group_key: tuple[int, int] | None = None
        self._group = None  # pyarrow.Table of the cached row group

    def read(self, unit: Unit) -> UnitRows:
        f = self.plan.files[unit.file]
        rows = UnitRows([], [], [])
        if f.format is InputFormat.JSONL:
            self._read_jsonl(f, unit, rows)
        else:
            self._read_parquet(f, unit, rows)
        return rows

    def _read_jsonl(self, f: InputFile, unit: Unit, rows: UnitRows) -> None:
        ids, texts = rows.ids, rows.texts
        with open(f.path, "rb") as fh:
            fh.seek(unit.byte_offset)
            line_no = unit.first_line - 1
            for line in fh:
                line_no += 1
                if not line.strip():
                    continue
                obj = _parse_line(line, Path(f.path), line_no)
                where = f"{f.path}:{line_no}"
                ids.append(self._check_id(obj.get(self.plan.id_column, _MISSING), where))
                texts.append(_check_text(obj.get(self.plan.text_column, _MISSING), where, self.plan.text_column))
                rows.where.append(where)
                if len(ids) == unit.rows:
                    break
        if len(ids) != unit.rows:
            raise CorpusInputError(f"{f.path} changed while embedding: expected {unit.rows} rows from line "
                                   f"{unit.first_line}, found {len(ids)}")

    def _read_parquet(self, f: InputFile, unit: Unit, rows: UnitRows) -> None:
        pf = _open_parquet(Path(f.path))
        ids, texts = rows.ids, rows.texts
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(unit.start, first), min(unit.stop, first + n)
            if lo < hi:
                table = self._row_group(pf, unit.file, g)
                part = table.slice(lo - first, hi - lo)
                for k, (i, t) in enumerate(zip(part.column(0).to_pylist(), part.column(1).to_pylist())):
                    where = f"{f.path} row {lo + k}"
                    ids.append(self._check_id(i, where))
                    texts.append(_check_text(t, where, self.plan.text_column))
                    rows.where.append(where)
            first += n

    def _row_group(self, pf, file_index: int, group: int):
        if self._group_key != (file_index, group):
            self._group = None  # drop the old group before decoding the next
            self._group = pf.read_row_group(group, columns=[self.plan.id_column, self.plan.text_column])
            self._group_key = (file_index, group)
        return self._group

    def _check_id(self, value: object, where: str) -> str | int:
        col = self.plan.id_column
        if value is _MISSING:
            raise CorpusInputError(f"{where}: no id column '{col}'")
        want = str if self.plan.id_kind is IdKind.STRING else int
        if value is None:
            raise CorpusInputError(f"{where}: id '{col}' is null")
        if isinstance(value, bool) or not isinstance(value, want):
            raise CorpusInputError(f"{where}: id '{col}' is {type(value).__name__} {value!r}, "
                                   f"expected {want.__name__} like the rest of the corpus")
        return value


_MISSING = object()


def _check_text(value: object, where: str, col: str) -> str:
    if value is _MISSING:
        raise CorpusInputError(f"{where}: no text column '{col}'")
    if value is None:
        raise CorpusInputError(f"{where}: text '{col}' is null")
    if not isinstance(value, str):
        raise CorpusInputError(f"{where}: text '{col}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise CorpusInputError(f"{where}: text '{col}' is empty or whitespace only")
    return value


def iter_id_locations(plan: InputPlan) -> Iterator[tuple[object, str]]:
    """Every (id, location) of the corpus in order, reading only the id column."""
    for f in plan.files:
        if f.format is InputFormat.JSONL:
            with open(f.path, "rb") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        yield _parse_line(line, Path(f.path), line_no).get(plan.id_column), f"{f.path}:{line_no}"
        else:
            row = 0
            for batch in _open_parquet(Path(f.path)).iter_batches(batch_size=65536, columns=[plan.id_column]):
                for value in batch.column(0).to_pylist():
                    yield value, f"{f.path} row {row}"
                    row += 1


def check_unique_ids(plan: InputPlan) -> None:
    """Refuse a duplicate id, naming both rows. Memory: 8 bytes per row (a hash), then one pass for the culprit."""
    hashes = np.fromiter((_id_hash(i) for i, _ in iter_id_locations(plan)), dtype=np.int64, count=plan.rows_total)
    sorted_h = np.sort(hashes)
    dup = sorted_h[1:][sorted_h[1:] == sorted_h[:-1]]
    del hashes, sorted_h
    if dup.size == 0:
        return
    suspects = set(dup.tolist())
    seen: dict[object, str] = {}
    for value, where in iter_id_locations(plan):
        if isinstance(value, (str, int)) and _id_hash(value) in suspects:
            if value in seen:
                raise CorpusInputError(f"duplicate id {value!r} at {seen[value]} and {where} "
                                       "(pass --allow-duplicate-ids to embed both)")
            seen[value] = where


def _id_hash(value: object) -> int:
    """A 64-bit hash of an id; ids of a bad type (null, float, list) hash to 0 and are refused when read."""
    return hash(value) if isinstance(value, (str, int)) else 0
