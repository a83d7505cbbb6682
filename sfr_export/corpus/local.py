"""``--engine local``: one process, units in input order, one shard written as each unit completes.

Memory is bounded by one unit (``chunk_rows`` rows and their embeddings) plus one Parquet row group, whatever the
corpus size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .config import UnitResult
from .io import InputPlan, Unit
from .worker import EmbedderOptions, PromptOptions, UnitWorker


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def run_local(plan: InputPlan, pending: Sequence[Unit], *, embedder: EmbedderOptions, prompt: PromptOptions,
              out: Path, dtype: str, on_unit: Callable[[UnitResult], None]) -> None:
    with embedder.open() as emb:
        worker = UnitWorker(emb, plan, prompt, out, dtype)
        for unit in pending:
            on_unit(worker.run(unit))
