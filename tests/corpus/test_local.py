"""``--engine local``: equality with ``Embedder.encode``, exactly-once output, resume, refusal of other runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sfr_export.corpus import (CorpusConfig, CorpusOutputError, InputType, OutputDtype, embed_corpus)
from sfr_export.runtime import Embedder

from conftest import N_ROWS, assert_matches_reference, pq, read_output

CHUNK = 250  # a.parquet: 4 units, b.parquet: 3, c.jsonl: 2 -> 9 shards


def cfg(artifact: Path, input: Path | str, out: Path, **kw) -> CorpusConfig:
    return CorpusConfig(artifact=artifact, input=str(input), output=out, chunk_rows=CHUNK, threads_per_worker=1, **kw)


def test_local_equals_library_row_for_row(tiny_artifact, corpus_input, corpus_ids, reference, tmp_path):
    out = tmp_path / "out"
    s = embed_corpus(cfg(tiny_artifact, corpus_input, out))
    assert (s.rows_total, s.rows_embedded, s.rows_skipped, s.shards_total) == (N_ROWS, N_ROWS, 0, 9)
    assert_matches_reference(out, corpus_ids, reference)
    table = pq.read_table(out)  # plain pyarrow on the dir: the record files are skipped
    assert table.schema.field("embedding").type.list_size == reference.shape[1]
    assert str(table.schema.field("embedding").type.value_type) == "float"
    import pandas as pd

    assert len(pd.read_parquet(out)) == N_ROWS
    record = json.loads((out / "_corpus.json").read_text())
    assert record["status"] == "complete" and record["rows_total"] == N_ROWS and record["dim"] == reference.shape[1]
    ident = record["identity"]
    assert ident["variant"] == "fp32" and ident["dtype"] == "float32" and ident["model_fingerprint"]
    assert ident["prompt_template"] == "{text}"  # documents: no instruction
    assert (out / "_SUCCESS").is_file()


def test_rerun_into_finished_output_is_a_noop(tiny_artifact, corpus_input, tmp_path):
    out = tmp_path / "out"
    embed_corpus(cfg(tiny_artifact, corpus_input, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    s = embed_corpus(cfg(tiny_artifact, corpus_input, out))
    assert s.already_complete and s.rows_embedded == 0 and s.rows_skipped == N_ROWS
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before


def test_query_float16_output_matches_encode_queries(tiny_artifact, corpus_input, corpus_texts, corpus_ids, tmp_path):
    out = tmp_path / "out"
    embed_corpus(cfg(tiny_artifact, corpus_input, out, input_type=InputType.QUERY, task="web_search",
                     dtype=OutputDtype.FLOAT16))
    table = pq.read_table(out)
    assert str(table.schema.field("embedding").type.value_type) == "halffloat"
    with Embedder.from_artifact(tiny_artifact, variant="fp32", intra_op_threads=1) as emb:
        ref = emb.encode_queries(corpus_texts[:300], task="web_search")
    ids, got = read_output(out)
    pos = {i: k for k, i in enumerate(ids)}
    np.testing.assert_array_equal(got[[pos[i] for i in corpus_ids[:300]]], ref.astype(np.float16).astype(np.float32))
    assert "{text}" in json.loads((out / "_corpus.json").read_text())["identity"]["prompt_template"]


class _Stop(Exception):
    pass


def test_resume_embeds_only_missing_rows(tiny_artifact, corpus_input, corpus_ids, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def stop_after_3(p):
        if p.units_done == 3:
            raise _Stop

    with pytest.raises(_Stop):
        embed_corpus(cfg(tiny_artifact, corpus_input, out), on_progress=stop_after_3)
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert len(first) == 3 and not (out / "_SUCCESS").exists()
    (out / ".part-00000005.parquet.999.tmp").write_bytes(b"half a shard")  # what a crash mid-write leaves
    assert len(pq.read_table(out)) == 3 * CHUNK  # readers see complete shards only

    embedded: list[int] = []
    real = Embedder.encode_ids

    def counting(self, seqs, **kw):
        embedded.append(len(seqs))
        return real(self, seqs, **kw)

    monkeypatch.setattr(Embedder, "encode_ids", counting)
    with pytest.raises(CorpusOutputError, match="partial run"):
        embed_corpus(cfg(tiny_artifact, corpus_input, out, resume=False))
    s = embed_corpus(cfg(tiny_artifact, corpus_input, out))
    assert sum(embedded) == N_ROWS - 3 * CHUNK == s.rows_embedded
    assert s.rows_skipped == 3 * CHUNK and s.shards_written == 6
    assert {n: v for n, v in ((p.name, (p.stat().st_ino, p.stat().st_mtime_ns)) for p in out.glob("part-*.parquet"))
            if n in first} == first  # the first run's shards were kept, not rewritten
    assert not list(out.glob(".*.tmp"))
    assert_matches_reference(out, corpus_ids, reference)


@pytest.mark.parametrize("change, what", [({"dtype": OutputDtype.FLOAT16}, "dtype"),
                                          ({"input_type": InputType.QUERY}, "prompt_template"),
                                          ({"variant": "fp16"}, "variant")])
def test_output_of_another_run_is_refused(tiny_artifact, corpus_input, tmp_path, change, what):
    out = tmp_path / "out"
    embed_corpus(cfg(tiny_artifact, Path(corpus_input) / "c.jsonl", out))
    with pytest.raises(CorpusOutputError, match=what) as err:
        embed_corpus(cfg(tiny_artifact, Path(corpus_input) / "c.jsonl", out, **change))
    assert "\n" not in str(err.value)


def test_other_input_is_refused_and_foreign_dir_too(tiny_artifact, corpus_input, tmp_path):
    out = tmp_path / "out"
    embed_corpus(cfg(tiny_artifact, Path(corpus_input) / "c.jsonl", out))
    with pytest.raises(CorpusOutputError, match="input_signature differs"):
        embed_corpus(cfg(tiny_artifact, Path(corpus_input) / "b.parquet", out))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(CorpusOutputError, match="not empty"):
        embed_corpus(cfg(tiny_artifact, Path(corpus_input) / "c.jsonl", foreign))


def test_glob_input_and_cli(tiny_artifact, corpus_input, tmp_path, capsys):
    from sfr_export.cli import main

    out = tmp_path / "out"
    main(["embed-corpus", str(tiny_artifact), "--input", str(Path(corpus_input) / "*.parquet"), "--output", str(out),
          "--chunk-rows", "500", "--threads", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_total"] == summary["rows_embedded"] == 1500 and summary["shards"] == 4
    assert len(pq.read_table(out)) == 1500
    with pytest.raises(SystemExit) as exc:
        main(["embed-corpus", str(tiny_artifact), "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nope.jsonl does not exist" in err and err.strip().count("\n") == 0


def test_integer_ids_stay_integers(tiny_artifact, tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"doc": 10 + i, "body": f"text {i}"}) + "\n" for i in range(5)))
    embed_corpus(CorpusConfig(artifact=tiny_artifact, input=str(src), output=tmp_path / "out", id_column="doc",
                              text_column="body", threads_per_worker=1))
    table = pq.read_table(tmp_path / "out")
    assert str(table.schema.field("id").type) == "int64" and table.column("id").to_pylist() == [10, 11, 12, 13, 14]


def test_corpus_stands_on_runtime_and_artifact_only():
    """Layering: importing and running the corpus package pulls in no pipeline stage, eval, serve or finetune code."""
    import subprocess
    import sys

    code = ("import sys, sfr_export.corpus, sfr_export.corpus.local, sfr_export.corpus.ray_engine; "
            "bad = [m for m in sys.modules if m.startswith(('sfr_export.stages', 'sfr_export.eval', "
            "'sfr_export.serve', 'sfr_export.finetune'))]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.strip() == ""
