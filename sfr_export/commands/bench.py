"""``sfr-export bench``: every backend/variant of an output dir side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._ui import console, parse_csv, parse_ints


def bench(
    directory: Path = typer.Argument(..., help="An sfr-export output dir."),
    batch_sizes: str = typer.Option("1,8,32", help="Comma-separated batch sizes."),
    seq_lens: str = typer.Option("32,128,512", help="Comma-separated sequence lengths (tokens)."),
    candidates: Optional[str] = typer.Option(None, help="e.g. torch:fp32,onnxruntime:int8 (default: all runnable)."),
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

    cfg = BenchConfig(batch_sizes=parse_ints(batch_sizes, name="--batch-sizes"),
                      seq_lens=parse_ints(seq_lens, name="--seq-lens"),
                      cell_seconds=cell_seconds, min_iters=min_iters, max_iters=max_iters, threads=threads,
                      candidates=tuple(parse_csv(candidates, name="--candidates")) if candidates else ())
    json_path = output or directory / "bench" / "bench.json"
    report = run_bench(directory, cfg, on_progress=lambda msg: console.print(f"[dim]bench[/] {msg}"))
    write_outputs(report, json_path, json_path.with_suffix(".png") if plot else None)
    typer.echo(markdown_table(report))
    typer.echo(f"\nwrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if plot else ""))


COMMANDS = {"bench": bench}
