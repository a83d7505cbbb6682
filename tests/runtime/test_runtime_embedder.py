"""Embedder hardening on the tiny-mistral artifact: backend choice, checksums, batching, truncation, threads, async."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sfr_export import Embedder
from sfr_export.errors import ArtifactError, ChecksumMismatchError, UserInputError
from sfr_export.runtime.embedder import BatchStats

TEXTS = [f"sentence {i}: " + "lorem ipsum dolor " * (i % 9) + f"tail {i}" for i in range(40)]


@pytest.fixture(scope="module")
def emb(tiny_artifact: Path):
    e = Embedder.from_artifact(tiny_artifact)
    yield e
    e.close()


def test_auto_picks_onnxruntime_fp32_on_cpu_and_says_why(tiny_artifact: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="sfr_export.runtime.embedder"):
        e = Embedder.from_artifact(tiny_artifact, backend="auto")
    assert e.info["backend"] == "onnxruntime" and e.info["variant"] == "fp32"
    assert "auto" in e.info["why"] and "fp32" in e.info["why"] and e.info["verified"] is True
    assert e.info["runner"]["providers"] == ["CPUExecutionProvider"]
    assert any("backend=onnxruntime" in r.getMessage() and "why=auto" in r.getMessage() for r in caplog.records)


def test_unknown_backend_and_variant_are_typed_errors(tiny_artifact: Path) -> None:
    with pytest.raises(UserInputError, match="unknown backend"):
        Embedder.from_artifact(tiny_artifact, backend="tensorflow")
    with pytest.raises(UserInputError, match="unknown variant 'int4'"):
        Embedder.from_artifact(tiny_artifact, variant="int4")
    with pytest.raises(ArtifactError, match="no 'int8-cpu' ONNX variant"):
        Embedder.from_artifact(tiny_artifact, variant="int8-cpu")


def test_checksum_mismatch_is_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    onnx = bad / "onnx" / "fp32" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    onnx.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        Embedder.from_artifact(bad, variant="fp32")
    onnx.write_bytes(bytes(data[:-10]))
    with pytest.raises(ChecksumMismatchError, match="truncated"):
        Embedder.from_artifact(bad, variant="fp32")


def test_torch_backend_verifies_the_model_dir_and_matches_onnx(tiny_artifact: Path, tmp_path: Path, emb) -> None:
    torch_emb = Embedder.from_artifact(tiny_artifact, backend="torch")
    assert torch_emb.info["backend"] == "torch"
    np.testing.assert_allclose(torch_emb.encode(TEXTS[:6]), emb.encode(TEXTS[:6]), atol=1e-5)
    # a copy whose manifest points at a model dir with different weights is refused
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    model = tmp_path / "model"
    shutil.copytree(manifest["model"]["local_dir"], model)
    weights = next(model.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    manifest["model"]["local_dir"] = str(model)
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ChecksumMismatchError, match="fingerprint"):
        Embedder.from_artifact(art, backend="torch")


def test_max_batch_tokens_bounds_every_runner_call_and_keeps_order(emb) -> None:
    ids = emb.tokenize(TEXTS).ids
    longest = max(map(len, ids))
    stats: list[BatchStats] = []
    got = emb.encode_ids(ids, batch_size=32, max_batch_tokens=2 * longest, on_batch=stats.append)
    assert all(s.padded_tokens <= 2 * longest for s in stats)
    assert sum(s.rows for s in stats) == len(TEXTS) and len(stats) > 2  # the budget, not batch_size=32, cut them
    one_by_one = np.stack([emb.encode_ids([s])[0] for s in ids])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    count_only: list[BatchStats] = []
    emb.encode_ids(ids, batch_size=8, on_batch=count_only.append)
    assert [s.rows for s in count_only] == [8] * 5


def test_truncation_policy_truncate_counts_and_error_refuses(tiny_artifact: Path, caplog) -> None:
    long_text = "word " * 500  # far over tiny-mistral's max_length=128
    e = Embedder.from_artifact(tiny_artifact, truncation="truncate")
    with caplog.at_level(logging.WARNING, logger="sfr_export.tokenization"):
        v = e.encode([long_text, "short", long_text])
    assert v.shape[0] == 3 and e.truncated_total == 2
    assert any("truncated 2 of 3" in r.getMessage() for r in caplog.records)
    assert len(e.tokenize(long_text).ids[0]) == e.spec.max_length
    with pytest.raises(UserInputError, match="over the limit"):
        e.encode([long_text], truncation="error")  # per-call override
    strict = Embedder.from_artifact(tiny_artifact, truncation="error")
    with pytest.raises(UserInputError, match="input 1 has .* tokens"):
        strict.encode(["fine", long_text])
    assert strict.truncated_total == 0
    np.testing.assert_allclose(strict.encode(["fine"]), e.encode(["fine"]), atol=1e-6)
    with pytest.raises(UserInputError, match="truncation policy"):
        Embedder.from_artifact(tiny_artifact, truncation="drop")


def test_concurrent_calls_equal_serial_results(emb) -> None:
    chunks = [TEXTS[i:i + 1 + i % 5] for i in range(len(TEXTS))]
    serial = [emb.encode(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            parallel = list(pool.map(emb.encode, chunks))
            for s, p in zip(serial, parallel):
                np.testing.assert_allclose(p, s, atol=1e-6)


def test_torch_runner_is_thread_safe_through_the_embedder(tiny_artifact: Path) -> None:
    e = Embedder.from_artifact(tiny_artifact, backend="torch", verify=False)
    chunks = [TEXTS[i:i + 3] for i in range(0, 24, 3)]
    serial = [e.encode(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(e.encode, chunks))
    for s, p in zip(serial, parallel):
        np.testing.assert_allclose(p, s, atol=1e-6)


def test_async_wrappers_match_sync(emb) -> None:
    async def main():
        return await asyncio.gather(emb.aencode(TEXTS[:4]), emb.aencode_queries(TEXTS[4:6], task="STSBenchmark"),
                                    emb.aencode_documents(TEXTS[6:8], task="TRECCOVID"),
                                    emb.aencode_ids(emb.tokenize(TEXTS[8:10]).ids))

    a, q, d, i = asyncio.run(main())
    np.testing.assert_allclose(a, emb.encode(TEXTS[:4]), atol=1e-6)
    np.testing.assert_allclose(q, emb.encode_queries(TEXTS[4:6], task="STSBenchmark"), atol=1e-6)
    np.testing.assert_allclose(d, emb.encode_documents(TEXTS[6:8], task="TRECCOVID"), atol=1e-6)
    np.testing.assert_allclose(i, emb.encode(TEXTS[8:10]), atol=1e-6)


def test_query_and_document_prompts_use_the_spec_templates(emb) -> None:
    q = ["what is rope scaling?"]
    sts_instruction = __import__("sfr_export.spec", fromlist=["task_instructions"]).task_instructions()["STSBenchmark"].instruction
    templated = emb.spec.format_query(q[0], sts_instruction)
    np.testing.assert_allclose(emb.encode_queries(q, task="STSBenchmark"), emb.encode([templated]), atol=1e-6)
    np.testing.assert_allclose(emb.encode_documents(q), emb.encode(q), atol=1e-6)  # documents: plain template
    assert np.abs(emb.encode_queries(q) - emb.encode(q)).max() > 1e-3


def test_encode_ids_rejects_out_of_vocabulary_and_bad_ids(emb) -> None:
    with pytest.raises(UserInputError, match="outside the vocabulary"):
        emb.encode_ids([[1, emb.vocab_size, 2]])
    with pytest.raises(UserInputError, match="outside the vocabulary"):
        emb.encode_ids([[1, -1, 2]])
    with pytest.raises(UserInputError, match="empty token list"):
        emb.encode_ids([[1, 2], []])
    with pytest.raises(UserInputError, match="not a token id"):
        emb.encode_ids([[1, 2.5]])
    with pytest.raises(UserInputError, match="empty"):
        emb.encode([])


def test_memory_stays_flat_over_repeated_calls(emb) -> None:
    """1,000 calls after warm-up grow RSS by less than 16 MB (benchmarks/bench_memory_flat.py runs 10k)."""
    import psutil

    proc = psutil.Process()
    shapes = [TEXTS[:2], TEXTS[5:8], TEXTS[10:11]]  # varying batch and sequence shapes
    for i in range(100):
        emb.encode(shapes[i % 3])
    before = proc.memory_info().rss
    for i in range(1000):
        emb.encode(shapes[i % 3])
    growth_mb = (proc.memory_info().rss - before) / 2**20
    assert growth_mb < 16, f"RSS grew {growth_mb:.1f} MB over 1000 calls"
