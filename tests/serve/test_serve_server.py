"""A real uvicorn server on 127.0.0.1: correctness under concurrent load, OpenAI schema, metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import random

import httpx
import numpy as np
import pytest

from sfr_export.serve.metrics import METRICS_HELP


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud engine violet quantum harbor lantern maple orbit".split()
    return [f"client {seed} item {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 40))) for i in range(n)]


def _rows(body: dict, fmt: str) -> np.ndarray:
    data = sorted(body["data"], key=lambda d: d["index"])
    assert [d["index"] for d in data] == list(range(len(data)))
    if fmt == "base64":
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    return np.asarray([d["embedding"] for d in data], dtype=np.float32)


def test_openai_schema_float_and_base64(server, direct_embedder) -> None:
    texts = ["A man is playing a guitar.", "Someone plays an instrument."]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/embeddings", json={"input": texts, "model": "whatever", "encoding_format": "float"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "demo:tiny-mistral"
        assert all(d["object"] == "embedding" for d in body["data"])
        want_ids = direct_embedder.tokenize(texts).ids
        assert body["usage"] == {"prompt_tokens": sum(map(len, want_ids)), "total_tokens": sum(map(len, want_ids))}
        direct = direct_embedder.encode(texts)
        np.testing.assert_allclose(_rows(body, "float"), direct, atol=1e-5)
        r64 = c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
        assert r64.status_code == 200
        np.testing.assert_array_equal(_rows(r64.json(), "base64"), _rows(body, "float"))
        # a single string, and token-id arrays (taken as the model's input, as Embedder.encode_ids does)
        one = c.post("/v1/embeddings", json={"input": texts[0]}).json()
        assert len(one["data"]) == 1
        ids = c.post("/v1/embeddings", json={"input": want_ids}).json()
        np.testing.assert_allclose(_rows(ids, "float"), direct, atol=1e-5)
        flat = c.post("/v1/embeddings", json={"input": want_ids[1]}).json()
        np.testing.assert_allclose(_rows(flat, "float")[0], direct[1], atol=1e-5)


def test_prompt_and_input_type_follow_the_embedder(server, direct_embedder) -> None:
    q = ["how do vaccines work?", "best pizza in naples"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        got_q = _rows(c.post("/v1/embeddings", json={"input": q, "input_type": "query"}).json(), "float")
        got_task = _rows(c.post("/v1/embeddings", json={"input": q, "input_type": "query", "prompt": "STSBenchmark"}).json(), "float")
        got_doc = _rows(c.post("/v1/embeddings", json={"input": q, "input_type": "document", "prompt": "TRECCOVID"}).json(), "float")
        got_inst = _rows(c.post("/v1/embeddings", json={"input": q, "instruction": "Find the recipe"}).json(), "float")
    np.testing.assert_allclose(got_q, direct_embedder.encode_queries(q), atol=1e-5)
    np.testing.assert_allclose(got_task, direct_embedder.encode_queries(q, task="STSBenchmark"), atol=1e-5)
    np.testing.assert_allclose(got_doc, direct_embedder.encode_documents(q, task="TRECCOVID"), atol=1e-5)
    np.testing.assert_allclose(got_inst, direct_embedder.encode_queries(q, instruction="Find the recipe"), atol=1e-5)
    assert np.abs(got_q - direct_embedder.encode(q)).max() > 1e-3  # the query prompt really changed the input


def test_correctness_under_concurrent_load(server, direct_embedder) -> None:
    """64 clients x 5 requests with distinct texts, 32 at a time: every row equals the direct Embedder row of its
    own text (no lost, duplicated or mixed-up rows)."""
    jobs = [(cid, k) for cid in range(64) for k in range(5)]

    async def run() -> list[tuple[list[str], str, int, dict]]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            async def call(job: tuple[int, int]):
                cid, k = job
                texts = _texts(cid * 1000 + k, 1 + (cid + k) % 7)
                fmt = "base64" if (cid + k) % 2 else "float"
                r = await c.post("/v1/embeddings", json={"input": texts, "encoding_format": fmt})
                return texts, fmt, r.status_code, r.json()
            return await asyncio.gather(*(call(j) for j in jobs))

    groups_before = _histogram(httpx.get(server.url + "/metrics", timeout=10).text, "sfr_group_inputs")
    results = asyncio.run(run())
    all_texts = [t for texts, *_ in results for t in texts]
    assert len(set(all_texts)) == len(all_texts)
    direct = direct_embedder.encode(all_texts)
    row = 0
    for texts, fmt, status, body in results:
        assert status == 200, body
        got = _rows(body, fmt)
        assert got.shape == (len(texts), direct.shape[1])
        np.testing.assert_allclose(got, direct[row:row + len(texts)], atol=1e-5)
        # no mix-up: each returned row is closest to its own text's embedding among all texts sent
        assert (np.argmax(got @ direct.T, axis=1) == np.arange(row, row + len(texts))).all()
        row += len(texts)
    groups = _histogram(httpx.get(server.url + "/metrics", timeout=10).text, "sfr_group_inputs")
    assert groups["sum"] - groups_before["sum"] == len(all_texts)  # every input went through the queue exactly once
    assert groups["count"] - groups_before["count"] < len(jobs)  # dynamic batching grouped concurrent requests


def _histogram(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_count "):
            out["count"] = float(line.split()[1])
        if line.startswith(name + "_sum "):
            out["sum"] = float(line.split()[1])
    return out


def test_health_ready_metrics(server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready").json()
        assert ready["ready"] is True and ready["backend"] == "onnxruntime" and ready["variant"] == "fp32"
        before = c.get("/metrics")
        assert before.headers["content-type"].startswith("text/plain")
        assert c.post("/v1/embeddings", json={"input": ["metric probe one", "metric probe two"]}).status_code == 200
        assert c.post("/v1/embeddings", json={"input": []}).status_code == 400
        text = c.get("/metrics").text
    for name in METRICS_HELP:
        assert f"# HELP {name.removesuffix('_total')}" in text or f"# HELP {name}" in text, name
    assert 'sfr_requests_total{code="200"}' in text and 'sfr_request_errors_total{code="empty_input"}' in text
    assert _histogram(text, "sfr_batch_size")["sum"] >= 2
    assert _histogram(text, "sfr_batch_tokens")["count"] >= 1
    assert "sfr_queue_depth 0.0" in text


def test_openai_python_client_shape(server) -> None:
    """What the official client sends (model + encoding_format=base64 by default) decodes to the float rows."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        body = c.post("/v1/embeddings", content=json.dumps({"input": ["x y z"], "model": "m", "encoding_format": "base64",
                                                            "user": "u1"}), headers={"content-type": "application/json"})
        f = c.post("/v1/embeddings", json={"input": ["x y z"]})
    assert body.status_code == 200
    np.testing.assert_array_equal(_rows(body.json(), "base64"), _rows(f.json(), "float"))


@pytest.mark.parametrize("path,method", [("/v1/nothing", "get"), ("/v1/embeddings", "get")])
def test_unknown_routes_get_openai_error_bodies(server, path: str, method: str) -> None:
    r = getattr(httpx, method)(server.url + path, timeout=10)
    assert r.status_code in (404, 405)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
