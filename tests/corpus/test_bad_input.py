"""Bad input: each case ends in one ``SfrExportError`` line naming the file and the row or column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfr_export.corpus import CorpusConfig, CorpusInputError, embed_corpus
from sfr_export.errors import UserInputError
from sfr_export.tokenization import Truncation

from conftest import pa, pq


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def parquet(path: Path, **cols) -> Path:
    pq.write_table(pa.table(cols), path)
    return path


GOOD = [{"id": "a", "text": "first row"}, {"id": "b", "text": "second row"}]
LONG = " ".join(["word"] * 400)  # over tiny-mistral's 128-token max_length

CASES = {
    # name: (make input under tmp, extra config, expected message parts)
    "jsonl missing id column": (lambda d: jsonl(d / "x.jsonl", [{"text": "no id"}]), {}, ["x.jsonl:1", "no id column 'id'"]),
    "jsonl id missing later": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"text": "no id"}]), {}, ["x.jsonl:3", "'id'"]),
    "parquet missing id column": (lambda d: parquet(d / "x.parquet", text=["t"]), {}, ["x.parquet", "no column 'id'"]),
    "parquet id of wrong type": (lambda d: parquet(d / "x.parquet", id=[1.5], text=["t"]), {},
                                 ["x.parquet", "id column 'id' has type double"]),
    "duplicate id column": (lambda d: _dup_col(d / "x.parquet"), {}, ["x.parquet", "column 'id' appears 2 times"]),
    "duplicate id": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": "a", "text": "again"}]), {},
                     ["duplicate id 'a'", "x.jsonl:1", "x.jsonl:3", "--allow-duplicate-ids"]),
    "null text parquet": (lambda d: parquet(d / "x.parquet", id=["a", "b"], text=["ok", None]), {},
                          ["x.parquet row 1", "text 'text' is null"]),
    "empty text jsonl": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": "c", "text": "   "}]), {},
                         ["x.jsonl:3", "empty or whitespace"]),
    "non-string text": (lambda d: jsonl(d / "x.jsonl", [{"id": "a", "text": 42}]), {}, ["x.jsonl:1", "int, not a string"]),
    "null id": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": None, "text": "t"}]), {}, ["x.jsonl:3", "id 'id' is null"]),
    "list id": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": [1], "text": "t"}]), {}, ["x.jsonl:3", "id 'id' is list"]),
    "mixed id types": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": 3, "text": "t"}]), {}, ["x.jsonl:3", "expected str"]),
    "malformed json": (lambda d: jsonl(d / "x.jsonl", GOOD + ['{"id": "c", "text": ']), {}, ["x.jsonl:3", "malformed JSON"]),
    "unreadable parquet": (lambda d: _bytes(d / "x.parquet", b"not parquet at all"), {},
                           ["x.parquet", "unreadable Parquet"]),
    "unknown format": (lambda d: _bytes(d / "x.csv", b"id,text\na,b\n"), {}, ["x.csv", "unknown input format '.csv'"]),
    "zero rows jsonl": (lambda d: _bytes(d / "x.jsonl", b"\n\n"), {}, ["x.jsonl", "zero rows"]),
    "zero rows parquet": (lambda d: parquet(d / "x.parquet", id=pa.array([], pa.string()), text=pa.array([], pa.string())),
                          {}, ["x.parquet", "zero rows"]),
    "over-long text": (lambda d: jsonl(d / "x.jsonl", GOOD + [{"id": "c", "text": LONG}]),
                       {"truncation": Truncation.ERROR}, ["x.jsonl:3", "tokens, over the limit", "truncation='error'"]),
    "missing input": (lambda d: d / "nope.parquet", {}, ["nope.parquet does not exist"]),
    "empty glob": (lambda d: str(d / "*.parquet"), {}, ["matches no file"]),
}


def _dup_col(path: Path) -> Path:
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["t"]), pa.array(["u"])], names=["id", "id", "text"]),
                   path)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error(name, tiny_artifact, tmp_path):
    make, extra, parts = CASES[name]
    d = tmp_path / "in"
    d.mkdir()
    src = make(d)
    with pytest.raises(UserInputError) as err:
        embed_corpus(CorpusConfig(artifact=tiny_artifact, input=str(src), output=tmp_path / "out", threads_per_worker=1,
                                  **extra))
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_duplicate_ids_allowed_on_request(tiny_artifact, tmp_path):
    src = jsonl(tmp_path / "x.jsonl", GOOD + [{"id": "a", "text": "again"}])
    s = embed_corpus(CorpusConfig(artifact=tiny_artifact, input=str(src), output=tmp_path / "out",
                                  allow_duplicate_ids=True, threads_per_worker=1))
    assert s.rows_embedded == 3
    assert pq.read_table(tmp_path / "out").column("id").to_pylist() == ["a", "b", "a"]


def test_bad_row_late_keeps_what_was_written(tiny_artifact, tmp_path):
    """A bad row in the third unit stops the run after two shards; fixing the row and resuming embeds only the rest."""
    rows = [{"id": f"r{i}", "text": f"row number {i}"} for i in range(50)]
    rows[45]["text"] = ""
    src = jsonl(tmp_path / "x.jsonl", rows)
    c = CorpusConfig(artifact=tiny_artifact, input=str(src), output=tmp_path / "out", chunk_rows=20, threads_per_worker=1)
    with pytest.raises(CorpusInputError, match=r"x\.jsonl:46: text 'text' is empty"):
        embed_corpus(c)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == ["part-00000000.parquet", "part-00000001.parquet"]
    rows[45]["text"] = "fixed"
    jsonl(src, rows)
    s = embed_corpus(c)
    assert (s.rows_embedded, s.rows_skipped) == (10, 40)
    assert sorted(pq.read_table(tmp_path / "out").column("id").to_pylist()) == sorted(r["id"] for r in rows)
