"""Request parsing and the lazy import of the [serve] extra (no server needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sfr_export.serve.protocol import ApiError, Limits, decode_embedding, embedding_response, parse_request


def test_parse_forms_of_input() -> None:
    lim = Limits(max_input_tokens=8)
    assert parse_request(b'{"input": "a"}', lim).texts == ["a"]
    assert parse_request(b'{"input": ["a", "b"]}', lim).texts == ["a", "b"]
    assert parse_request(b'{"input": [1, 2, 3]}', lim).token_ids == [[1, 2, 3]]
    assert parse_request(b'{"input": [[1], [2, 3]]}', lim).token_ids == [[1], [2, 3]]
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps({"input": [[1] * 9]}).encode(), lim)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_response_round_trips_float32_exactly() -> None:
    emb = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for fmt in ("float", "base64"):
        body = json.loads(embedding_response(emb, encoding_format=fmt, model="m", prompt_tokens=7))
        got = np.stack([decode_embedding(d["embedding"], fmt) for d in body["data"]])
        np.testing.assert_array_equal(got, emb)
        assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_serve_is_lazy_and_a_missing_extra_is_named() -> None:
    """Importing sfr_export.serve pulls in no FastAPI/uvicorn; without FastAPI, create_app names the [serve] extra."""
    code = ("import sys\n"
            "import sfr_export.serve\n"
            "print('fastapi' in sys.modules, 'uvicorn' in sys.modules)\n"
            "sys.modules['fastapi'] = None\n"
            "from sfr_export.errors import MissingDependencyError\n"
            "try:\n    sfr_export.serve.create_app(None)\nexcept MissingDependencyError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "False False", out.stderr
    assert "sfr-export[serve]" in lines[1], out.stderr
