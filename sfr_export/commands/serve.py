"""``sfr-export serve``: the OpenAI-compatible embedding server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..artifact import Backend, Variant


def serve(
    directory: Path = typer.Argument(..., help="An sfr-export output dir."),
    host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
    port: int = typer.Option(8080, help="TCP port."),
    backend: Backend = typer.Option(Backend.AUTO, case_sensitive=False, help="Runner backend."),
    variant: Optional[Variant] = typer.Option(None, case_sensitive=False, help="ONNX variant (default: best here)."),
    model_name: Optional[str] = typer.Option(None, help="The `model` echoed in responses (default: manifest id)."),
    truncation: str = typer.Option("error", help="error: over-long texts get 400 | truncate: cut to max length."),
    max_batch_tokens: int = typer.Option(8192, help="Token budget of one dynamic batch."),
    max_batch_size: int = typer.Option(64, help="Rows per runner call."),
    max_wait_ms: float = typer.Option(5.0, help="How long a request waits for others to batch with."),
    max_queue: int = typer.Option(2048, help="Inputs allowed to wait; beyond this requests get 429 (retry later)."),
    max_inputs: Optional[int] = typer.Option(None, help="Inputs per request; at most --max-queue (default: 2048, or --max-queue when smaller)."),
    max_input_chars: int = typer.Option(100_000, help="Characters per text input."),
    max_request_bytes: int = typer.Option(2 * 1024 * 1024, help="Request body size."),
    shutdown_timeout: float = typer.Option(30.0, help="Seconds to drain in-flight requests on SIGTERM."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checksum verification at load."),
) -> None:
    """Serve POST /v1/embeddings (OpenAI schema), /health, /ready and /metrics with dynamic batching."""
    from ..serve import BatchingConfig, EmbedderOptions, ServeConfig, run_server

    cfg = ServeConfig(host=host, port=port, model_name=model_name, truncation=truncation, max_inputs=max_inputs,
                      max_input_chars=max_input_chars, max_request_bytes=max_request_bytes,
                      shutdown_timeout_s=shutdown_timeout,
                      batching=BatchingConfig(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
                                              max_wait_ms=max_wait_ms, max_queue_inputs=max_queue))
    run_server(directory, cfg, EmbedderOptions(backend=backend.value, variant=variant.value if variant else None,
                                                verify=not no_verify))


COMMANDS = {"serve": serve}
