"""Service commands: ``serve`` (OpenAI-compatible embedding server) and ``bench`` (side-by-side backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        directory: Path = typer.Argument(..., help="An sfr-export output dir."),
        host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
        port: int = typer.Option(8080, help="TCP port."),
        backend: str = typer.Option("auto", help="auto | onnxruntime | torch | tensorrt"),
        variant: Optional[str] = typer.Option(None, help="ONNX variant: fp32 | fp16 | int8 | ..."),
        model_name: Optional[str] = typer.Option(None, help="The `model` echoed in responses (default: manifest id)."),
        truncation: str = typer.Option("error", help="error: over-long texts get 400 | truncate: cut to max length."),
        max_batch_tokens: int = typer.Option(8192, help="Token budget of one dynamic batch."),
        max_batch_size: int = typer.Option(64, help="Rows per runner call."),
        max_wait_ms: float = typer.Option(5.0, help="How long a request waits for others to batch with."),
        max_queue: int = typer.Option(1024, help="Inputs allowed to wait; beyond this requests get 429."),
        max_inputs: int = typer.Option(2048, help="Inputs per request."),
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
        run_server(directory, cfg, EmbedderOptions(backend=backend, variant=variant, verify=not no_verify))

    @app.command()
    def bench(
        directory: Path = typer.Argument(..., help="An sfr-export output dir."),
        batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
        seq_lens: str = typer.Option("32,128,512", help="Comma-separated sequence lengths (tokens)."),
        candidates: Optional[str] = typer.Option(None, help="e.g. torch:fp32,onnxruntime:int8 (default: all present)."),
        cell_seconds: float = typer.Option(2.0, help="Time spent measuring each batch/seq cell."),
        min_iters: int = typer.Option(3, help="Timed calls per cell, at least."),
        max_iters: int = typer.Option(50, help="Timed calls per cell, at most."),
        threads: Optional[int] = typer.Option(None, help="Intra-op threads for torch and ONNX Runtime (default: theirs)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON path (default DIR/bench/bench.json)."),
        plot: bool = typer.Option(True, help="Also write a PNG plot beside the JSON."),
    ) -> None:
        """Benchmark every backend/variant of DIR side by side (each in a fresh process): tokens/s, p50/p99,
        peak RSS, model size, ratios against torch fp32."""
        from ..bench import BenchConfig, markdown_table, run_bench, write_outputs
        from ..cli import console, parse_csv

        cfg = BenchConfig(batch_sizes=tuple(int(x) for x in parse_csv(batch_sizes, name="--batch-sizes")),
                          seq_lens=tuple(int(x) for x in parse_csv(seq_lens, name="--seq-lens")),
                          cell_seconds=cell_seconds, min_iters=min_iters, max_iters=max_iters, threads=threads,
                          candidates=tuple(parse_csv(candidates, name="--candidates")) if candidates else ())
        json_path = output or directory / "bench" / "bench.json"
        report = run_bench(directory, cfg, on_progress=lambda msg: console.print(f"[dim]bench[/] {msg}"))
        write_outputs(report, json_path, json_path.with_suffix(".png") if plot else None)
        typer.echo(markdown_table(report))
        typer.echo(f"\nwrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if plot else ""))
