"""``sfr-export embed-corpus``: embed a whole corpus into Parquet shards (local, or Ray Data for scale-out)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..artifact import Backend, Variant
from ..corpus.config import EngineKind, InputType, OutputDtype
from ..tokenization import Truncation
from ._ui import console, print_json

PLAIN_EVERY_S = 10.0  # plain progress lines (not a terminal): at most one per this many seconds


def embed_corpus_cmd(
    directory: Path = typer.Argument(..., help="An sfr-export output dir (the model artifact)."),
    input: str = typer.Option(..., "--input", "-i", help="Parquet or JSONL: a file, a dir of files, or a glob."),
    output: Path = typer.Option(..., "--output", "-o", help="Output dir of Parquet shards."),
    id_column: str = typer.Option("id", help="Input column holding the row id."),
    text_column: str = typer.Option("text", help="Input column holding the text."),
    input_type: InputType = typer.Option(InputType.DOCUMENT, case_sensitive=False, help="Query texts get the task instruction."),
    task: Optional[str] = typer.Option(None, help="Task / prompt name (queries default to web_search)."),
    variant: Optional[Variant] = typer.Option(None, case_sensitive=False, help="ONNX variant (default: best here)."),
    backend: Backend = typer.Option(Backend.AUTO, case_sensitive=False, help="Runner backend."),
    dtype: OutputDtype = typer.Option(OutputDtype.FLOAT32, case_sensitive=False, help="Stored embedding dtype."),
    batch_tokens: int = typer.Option(16384, help="Padded-token budget of one runner call."),
    batch_size: int = typer.Option(64, help="Rows per runner call, at most."),
    chunk_rows: int = typer.Option(4096, help="Rows per unit of work and per output shard."),
    truncation: Truncation = typer.Option(Truncation.TRUNCATE, case_sensitive=False, help="truncate: cut over-long texts | error: refuse them."),
    engine: EngineKind = typer.Option(EngineKind.LOCAL, case_sensitive=False, help="local (one process) | ray (Ray Data actor pool)."),
    ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: start a local one)."),
    workers: Optional[int] = typer.Option(None, help="Ray actors (default: one per GPU, else one per node)."),
    threads: Optional[int] = typer.Option(None, help="ORT threads per worker (Ray: CPUs per actor)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Finish a partial output (default) or refuse it."),
    allow_duplicate_ids: bool = typer.Option(False, "--allow-duplicate-ids", help="Embed rows sharing an id."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip checksum verification at load."),
) -> None:
    """Embed every row of --input exactly once into Parquet shards (id, embedding) under --output, resumably."""
    from ..corpus import CorpusConfig, embed_corpus

    cfg = CorpusConfig(
        artifact=directory, input=input, output=output, id_column=id_column, text_column=text_column,
        input_type=input_type, task=task, variant=variant, backend=backend,
        dtype=dtype, batch_tokens=batch_tokens, batch_size=batch_size,
        chunk_rows=chunk_rows, engine=engine, ray_address=ray_address,
        workers=workers, threads_per_worker=threads, resume=resume, truncation=truncation,
        allow_duplicate_ids=allow_duplicate_ids, verify=not no_verify)
    with _progress() as on_progress:
        summary = embed_corpus(cfg, on_progress=on_progress)
    if summary.already_complete:
        typer.echo(f"{output} is already complete ({summary.rows_total} rows): nothing to do", err=True)
    print_json({"output": str(summary.output), "engine": summary.engine, "rows_total": summary.rows_total,
                "rows_embedded": summary.rows_embedded, "rows_skipped": summary.rows_skipped,
                "shards": summary.shards_total, "shards_written": summary.shards_written,
                "tokens": summary.tokens, "dim": summary.dim, "wall_seconds": round(summary.wall_seconds, 3),
                "rows_per_second": round(summary.rows_per_second, 1),
                "tokens_per_second": round(summary.tokens_per_second, 1),
                "already_complete": summary.already_complete})




class _progress:
    """A rich bar (rows/s, ETA) on a terminal; plain lines on stderr otherwise."""

    def __enter__(self):
        self.last = 0.0
        self.bar = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]embed-corpus[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} rows/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, transient=True)
            self.bar.__enter__()
            self.task = None
        return self.update

    def update(self, p) -> None:
        rate = p.rows_done / p.elapsed if p.elapsed > 0 else 0.0
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task("rows", total=p.rows_todo, rate="0")
            self.bar.update(self.task, completed=p.rows_done, rate=f"{rate:,.0f}")
            return
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S or p.units_done == p.units_todo:
            self.last = now
            eta = (p.rows_todo - p.rows_done) / rate if rate > 0 else float("nan")
            print(f"embed-corpus: {p.rows_done}/{p.rows_todo} rows, {p.units_done}/{p.units_todo} shards, "
                  f"{rate:,.0f} rows/s, {p.tokens / p.elapsed:,.0f} tokens/s, ETA {eta:,.0f}s",
                  file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


COMMANDS = {"embed-corpus": embed_corpus_cmd}
