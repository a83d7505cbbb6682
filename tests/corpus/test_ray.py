"""``--engine ray`` on a 2-CPU local Ray instance (one per module): equality, a killed actor, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfr_export.corpus import CorpusConfig, CorpusInputError, EngineKind, embed_corpus
from sfr_export.corpus.worker import CRASH_AFTER_ENV, CRASH_MARKER_ENV

from conftest import N_ROWS, assert_matches_reference, pq

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def cfg(artifact: Path, input: Path | str, out: Path, **kw) -> CorpusConfig:
    return CorpusConfig(artifact=artifact, input=str(input), output=out, chunk_rows=250, engine=EngineKind.RAY,
                        workers=2, threads_per_worker=1, **kw)


def test_ray_equals_library_row_for_row(tiny_artifact, corpus_input, corpus_ids, reference, tmp_path):
    out = tmp_path / "out"
    s = embed_corpus(cfg(tiny_artifact, corpus_input, out))
    assert (s.engine, s.rows_embedded, s.shards_written) == ("ray", N_ROWS, 9)
    assert_matches_reference(out, corpus_ids, reference)
    assert ray.data.read_parquet(str(out)).count() == N_ROWS  # Ray Data reads it back (record files skipped)


def test_killed_actor_still_every_id_exactly_once(tiny_artifact, corpus_input, corpus_ids, reference, tmp_path,
                                                  monkeypatch):
    """The first actor to finish embedding its second unit dies (os._exit) before writing it; Ray restarts it and
    re-runs its units."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(CRASH_AFTER_ENV, "1")
    monkeypatch.setenv(CRASH_MARKER_ENV, str(marker))
    out = tmp_path / "out"
    s = embed_corpus(cfg(tiny_artifact, corpus_input, out))
    assert marker.is_file(), "no actor was killed: the test did not test anything"
    assert s.rows_embedded == N_ROWS and s.shards_written == 9
    assert_matches_reference(out, corpus_ids, reference)
    assert not list(out.glob(".*.tmp"))


def test_ray_bad_row_is_our_one_line_error(tiny_artifact, tmp_path):
    src = tmp_path / "x.parquet"
    pq.write_table(__import__("pyarrow").table({"id": ["a", "b", "c"], "text": ["ok", "fine", None]}), src)
    with pytest.raises(CorpusInputError, match=r"x\.parquet row 2: text 'text' is null") as err:
        embed_corpus(cfg(tiny_artifact, src, tmp_path / "out"))
    assert "\n" not in str(err.value)
