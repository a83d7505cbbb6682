"""Fixtures of the corpus tests: the tiny artifact, 2,000 shipped texts as Parquet and JSONL, their reference
embeddings from ``Embedder.encode``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from shipped import shipped_texts  # noqa: E402

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N_ROWS = 2000


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return shipped_texts(N_ROWS)


@pytest.fixture(scope="session")
def corpus_ids() -> list[str]:
    return [f"doc-{i:05d}" for i in range(N_ROWS)]


@pytest.fixture(scope="session")
def corpus_input(tmp_path_factory: pytest.TempPathFactory, corpus_texts, corpus_ids) -> Path:
    """A dir of two Parquet files (small row groups) and one JSONL file holding the 2,000 rows."""
    root = tmp_path_factory.mktemp("corpus_input")
    pq.write_table(pa.table({"id": corpus_ids[:800], "text": corpus_texts[:800], "extra": list(range(800))}),
                   root / "a.parquet", row_group_size=300)
    pq.write_table(pa.table({"id": corpus_ids[800:1500], "text": corpus_texts[800:1500]}), root / "b.parquet",
                   row_group_size=1000)
    with open(root / "c.jsonl", "w", encoding="utf-8") as fh:
        for i, t in zip(corpus_ids[1500:], corpus_texts[1500:]):
            fh.write(json.dumps({"id": i, "text": t}) + "\n")
            if i.endswith("7"):
                fh.write("\n")  # blank lines are skipped
    return root


@pytest.fixture(scope="session")
def reference(tiny_artifact: Path, corpus_texts) -> np.ndarray:
    """``Embedder.encode`` of the 2,000 texts: what every engine must reproduce row for row."""
    from sfr_export.runtime import Embedder

    with Embedder.from_artifact(tiny_artifact, variant="fp32", intra_op_threads=1) as emb:
        return emb.encode(corpus_texts)


def read_output(out: Path) -> tuple[list, np.ndarray]:
    """(ids, embeddings) of an output dir, read with plain pyarrow."""
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    return ids, emb


def assert_matches_reference(out: Path, corpus_ids: list[str], reference: np.ndarray, atol: float = 1e-6) -> None:
    ids, emb = read_output(out)
    assert len(ids) == len(set(ids)) == len(corpus_ids), "every id exactly once"
    assert set(ids) == set(corpus_ids)
    pos = {i: k for k, i in enumerate(ids)}
    got = emb[[pos[i] for i in corpus_ids]]
    assert float(np.abs(got - reference).max()) <= atol
