"""A request the server could never take gets a 400 naming the limit, never 429; 429 means "full now, retry".

The limits are checked at startup: a per-request input limit above the queue bound is a one-line config error.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sfr_export.errors import UserInputError
from sfr_export.serve import ApiError, BatchingConfig, BatchQueue, ServeConfig

REPO = Path(__file__).resolve().parents[2]


def test_default_limits_are_consistent() -> None:
    cfg = ServeConfig()
    assert cfg.max_inputs == 2048 <= cfg.batching.max_queue_inputs


def test_per_request_limit_defaults_to_the_queue_bound_when_smaller() -> None:
    assert ServeConfig(batching=BatchingConfig(max_queue_inputs=16)).max_inputs == 16


def test_per_request_limit_over_the_queue_bound_is_a_config_error() -> None:
    with pytest.raises(UserInputError, match=r"--max-inputs 100 is over --max-queue 16"):
        ServeConfig(max_inputs=100, batching=BatchingConfig(max_queue_inputs=16))
    with pytest.raises(UserInputError, match="--max-inputs must be >= 1"):
        ServeConfig(max_inputs=0)


def test_cli_refuses_inconsistent_limits_in_one_line_before_loading(tmp_path: Path) -> None:
    """The check runs before the artifact is read: the dir given here does not even exist."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "sfr_export.cli", "serve", str(tmp_path / "nope"), "--max-queue", "16",
                        "--max-inputs", "100"], capture_output=True, text=True, env=env, timeout=60)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert "Traceback" not in out
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1 and "--max-inputs 100 is over --max-queue 16" in lines[0], out


def test_queue_refuses_a_request_larger_than_itself_with_400(direct_embedder) -> None:
    async def main() -> ApiError:
        q = BatchQueue(direct_embedder, BatchingConfig(max_queue_inputs=5, max_wait_ms=10))
        q.start()
        try:
            with pytest.raises(ApiError) as exc:  # idle queue: 6 inputs can never fit
                await q.submit(direct_embedder.tokenize([f"t{i}" for i in range(6)]).ids)
            ok = await q.submit(direct_embedder.tokenize([f"t{i}" for i in range(5)]).ids)  # exactly the bound
            assert ok.shape[0] == 5
        finally:
            await q.close()
        return exc.value

    err = asyncio.run(main())
    assert err.status == 400 and err.code == "too_many_inputs" and "limit of 5" in err.message


def test_oversized_request_on_idle_server_gets_400_not_429(small_queue_server) -> None:
    """--max-queue 16 and no --max-inputs: 16 inputs per request. 17 gets 400 naming the limit, at once and
    every time (a client that retried a 429 would retry forever); 16 are served."""
    url = small_queue_server.url + "/v1/embeddings"
    for _ in range(3):
        r = httpx.post(url, json={"input": [f"big {i}" for i in range(17)]}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_inputs" and "limit of 16" in err["message"]
        assert "retry-after" not in r.headers
    r = httpx.post(url, json={"input": [f"fits {i}" for i in range(16)]}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 16
