"""Session fixtures of the server tests: the direct Embedder and a real server over the tiny-mistral artifact."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("httpx", reason="the [serve] extra (httpx) is needed for the server tests")
pytest.importorskip("fastapi", reason="the [serve] extra (fastapi) is needed for the server tests")

from serve_helpers import start_server  # noqa: E402


@pytest.fixture(scope="session")
def direct_embedder(tiny_artifact: Path):
    """The library path the server must agree with: the same artifact, backend and variant."""
    from sfr_export import Embedder

    emb = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant="fp32")
    yield emb
    emb.close()


@pytest.fixture(scope="session")
def server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    """The main server, with the default limits (max 2048 inputs, 100k chars per input, 2 MiB per request)."""
    srv = start_server(tiny_artifact, tmp_path_factory.mktemp("serve-logs"), "--variant", "fp32", "--max-wait-ms", "10")
    yield srv
    rc = srv.stop()
    assert rc in (0, -signal.SIGTERM), f"server exited with {rc} on SIGTERM:\n{srv.log()}"


@pytest.fixture(scope="module")  # module: test_sigterm_drains_queued_requests stops it
def small_queue_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    """At most 16 queued inputs (so at most 16 per request); a group closes at 16 rows or after 1.5 s (so requests
    surely queue up)."""
    srv = start_server(tiny_artifact, tmp_path_factory.mktemp("bp-logs"), "--variant", "fp32", "--max-queue", "16",
                       "--max-wait-ms", "1500", "--max-batch-size", "16")
    yield srv
    srv.stop()
