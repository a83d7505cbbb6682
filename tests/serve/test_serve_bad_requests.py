"""Bad requests get the right 4xx with an OpenAI-style error body, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

BAD = [
    # (id, raw body, status, error code)
    ("empty-string", json.dumps({"input": ""}).encode(), 400, "empty_input"),
    ("whitespace", json.dumps({"input": ["ok", "   "]}).encode(), 400, "empty_input"),
    ("empty-list", json.dumps({"input": []}).encode(), 400, "empty_input"),
    ("10k-inputs", json.dumps({"input": ["w"] * 10_000}).encode(), 400, "too_many_inputs"),
    ("1MB-string", json.dumps({"input": "x" * 1_000_000}).encode(), 400, "input_too_long"),
    ("3MB-body", json.dumps({"input": ["y" * 50_000] * 60}).encode(), 413, "request_too_large"),
    ("non-utf8", b'{"input": "caf\xe9 \xff\xfe"}', 400, "invalid_encoding"),
    ("lone-surrogate", b'{"input": "bad \\ud800 text"}', 400, "invalid_encoding"),
    ("not-json", b"{input: nope", 400, "invalid_json"),
    ("body-is-list", b'["a", "b"]', 400, "invalid_type"),
    ("missing-input", json.dumps({"model": "m"}).encode(), 400, "missing_input"),
    ("input-number", json.dumps({"input": 42}).encode(), 400, "invalid_type"),
    ("input-null", json.dumps({"input": None}).encode(), 400, "invalid_type"),
    ("input-mixed", json.dumps({"input": ["a", 1]}).encode(), 400, "invalid_type"),
    ("input-floats", json.dumps({"input": [[1.5, 2.0]]}).encode(), 400, "invalid_type"),
    ("input-bool-ids", json.dumps({"input": [[True, 5]]}).encode(), 400, "invalid_type"),
    ("model-not-string", json.dumps({"input": "a", "model": 5}).encode(), 400, "invalid_type"),
    ("unknown-format", json.dumps({"input": "a", "encoding_format": "int8"}).encode(), 400, "invalid_encoding_format"),
    ("unknown-field", json.dumps({"input": "a", "temperature": 0.2}).encode(), 400, "unknown_parameter"),
    ("unknown-prompt", json.dumps({"input": "a", "prompt": "no-such-task"}).encode(), 400, "invalid_prompt"),
    ("bad-input-type", json.dumps({"input": "a", "input_type": "passage"}).encode(), 400, "invalid_input_type"),
    ("wrong-dimensions", json.dumps({"input": "a", "dimensions": 7}).encode(), 400, "invalid_dimensions"),
    ("ids-negative", json.dumps({"input": [[1, -3, 2]]}).encode(), 400, "invalid_token_id"),
    ("ids-oov", json.dumps({"input": [[1, 32000, 2]]}).encode(), 400, "invalid_token_id"),
    ("ids-huge", json.dumps({"input": [[1, 2**63 + 5]]}).encode(), 400, "invalid_token_id"),
    ("ids-empty-array", json.dumps({"input": [[1, 2], []]}).encode(), 400, "empty_input"),
    ("ids-too-long", json.dumps({"input": [[5] * 129]}).encode(), 400, "context_length_exceeded"),
    ("ids-with-prompt", json.dumps({"input": [[1, 5, 2]], "prompt": "STSBenchmark"}).encode(), 400, "conflicting_parameters"),
    ("text-too-many-tokens", json.dumps({"input": "word " * 400}).encode(), 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error(server, name: str, body: bytes, status: int, code: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (name, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == code and err["type"] == "invalid_request_error" and err["message"]
        # the server keeps serving
        ok = c.post("/v1/embeddings", json={"input": [f"still alive after {name}"]})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_error_counters_track_bad_requests(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post("/v1/embeddings", content=b'{"input": []}', headers={"content-type": "application/json"})
        text = c.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith('sfr_request_errors_total{code="empty_input"}'))
    assert float(line.split()[1]) >= 1
    assert 'sfr_requests_total{code="400"}' in text
