"""``embed_corpus``: the library entry point behind ``sfr-export embed-corpus``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError
from ..artifact import Artifact, Backend
from .config import CorpusConfig, CorpusSummary, EngineKind, UnitResult
from .io import InputPlan, check_unique_ids, plan_input
from .output import (CorpusRecord, RunIdentity, clean_temp_files, done_units, is_complete, prepare_output,
                     write_record, write_success)
from .worker import EmbedderOptions, PromptOptions

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class CorpusProgress:
    """Passed to ``on_progress`` after each unit."""

    rows_done: int  # this run
    rows_todo: int  # this run
    units_done: int
    units_todo: int
    tokens: int
    elapsed: float
    last: UnitResult


def resolve_model(cfg: CorpusConfig, gpu: bool) -> tuple[str, str | None, str]:
    """(backend, variant for Embedder.from_artifact, variant name for the record), decided once for every worker."""
    art = Artifact.open(cfg.artifact)
    variants = art.variants()
    backend = cfg.backend
    if backend is Backend.AUTO:
        backend = Backend.ONNXRUNTIME if variants else Backend.TORCH
    if backend is Backend.ONNXRUNTIME:
        variant = cfg.variant or art.preferred_variant(cuda=gpu)
        if variant not in variants:
            have = ", ".join(v.value for v in variants) or "none"
            raise ArtifactError(f"{cfg.artifact} has no ONNX variant '{variant.value}' (have: {have})")
        return backend.value, variant.value, variant.value
    if backend is Backend.TORCH:
        return backend.value, None, f"torch-{art.manifest.data.get('reference_dtype', 'float32')}"
    name = cfg.variant.value if cfg.variant else None
    return backend.value, name, name or backend.value


def build_record(cfg: CorpusConfig, plan: InputPlan, backend: str, variant: str) -> CorpusRecord:
    art = Artifact.open(cfg.artifact)
    manifest = art.manifest
    spec = art.spec()
    prompt = PromptOptions(cfg.input_type, cfg.task)
    kw = prompt.kwargs()
    template = spec.apply_prompt(["{text}"], kw["prompt"], side=str(kw["side"]))[0]
    ident = RunIdentity(model_id=str(manifest.model.get("id")), model_fingerprint=str(manifest.model.get("fingerprint")),
                        backend=backend, variant=variant, spec=json.dumps(spec.to_dict(), sort_keys=True),
                        input_type=cfg.input_type.value, task=str(kw["prompt"]) if kw["prompt"] else None,
                        prompt_template=template, dtype=cfg.dtype.value, truncation=cfg.truncation.value,
                        input_signature=plan.signature())
    return CorpusRecord(identity=ident, artifact=str(Path(cfg.artifact).resolve()), input=cfg.input,
                        files=len(plan.files), rows_total=plan.rows_total, shards_total=len(plan.units),
                        id_column=cfg.id_column, text_column=cfg.text_column, chunk_rows=cfg.chunk_rows,
                        engine=cfg.engine.value)


def embed_corpus(cfg: CorpusConfig, *, on_progress: Callable[[CorpusProgress], None] | None = None) -> CorpusSummary:
    """Embed every row of ``cfg.input`` into Parquet shards under ``cfg.output``, exactly once, resumably."""
    t0 = time.perf_counter()
    out = Path(cfg.output)
    plan = plan_input(cfg.input, id_column=cfg.id_column, text_column=cfg.text_column, chunk_rows=cfg.chunk_rows)
    cluster = None
    if cfg.engine is EngineKind.RAY:
        from .ray_engine import RayCluster

        cluster = RayCluster(cfg.ray_address)
    try:
        if cluster is not None:
            gpu = cluster.gpus() > 0
        else:
            from .local import cuda_available

            gpu = cuda_available()
        backend, variant, variant_name = resolve_model(cfg, gpu)
        record = build_record(cfg, plan, backend, variant_name)
        old = prepare_output(out, record, resume=cfg.resume)
        if old is not None and is_complete(out):
            log.info("%s is already complete (%d rows): nothing to do", out, old.rows_total)
            return CorpusSummary(out, cfg.engine.value, old.rows_total, 0, old.rows_total, old.shards_total, 0, 0,
                                 time.perf_counter() - t0, already_complete=True, dim=old.dim,
                                 record_path=out / "_corpus.json")
        if not cfg.allow_duplicate_ids:
            check_unique_ids(plan)
        if old is not None:
            record.created = old.created
        write_record(out, record)
        clean_temp_files(out)
        done = done_units(out, plan)
        pending = [u for u in plan.units if u.index not in done]
        opts = EmbedderOptions(str(cfg.artifact), backend, variant, cfg.truncation, cfg.batch_size,
                               cfg.batch_tokens, cfg.verify, cfg.threads_per_worker)
        tally = _Tally(pending, t0, on_progress)
        _run_engine(cfg, cluster, plan, pending, opts, tally)
    finally:
        if cluster is not None:
            cluster.close()
    return _finish(cfg, out, record, plan, done, tally, t0)


def _run_engine(cfg: CorpusConfig, cluster, plan: InputPlan, pending, opts: EmbedderOptions, tally: "_Tally") -> None:
    if not pending:
        return
    prompt = PromptOptions(cfg.input_type, cfg.task)
    if cluster is None:
        from .local import run_local

        run_local(plan, pending, embedder=opts, prompt=prompt, out=Path(cfg.output), dtype=cfg.dtype.value,
                  on_unit=tally)
    else:
        from .ray_engine import run_ray

        layout = cluster.layout(cfg.workers, cfg.threads_per_worker)
        log.info("ray: %d actors x %d CPUs%s", layout.workers, layout.threads, " + 1 GPU" if layout.gpus else "")
        run_ray(cluster, layout, plan, pending, embedder=opts, prompt=prompt, out=Path(cfg.output),
                dtype=cfg.dtype.value, on_unit=tally)


class _Tally:
    def __init__(self, pending, t0: float, on_progress: Callable[[CorpusProgress], None] | None):
        self.rows_todo = sum(u.rows for u in pending)
        self.units_todo = len(pending)
        self.rows = self.units = self.tokens = 0
        self.dim: int | None = None
        self.t0 = t0
        self.on_progress = on_progress

    def __call__(self, r: UnitResult) -> None:
        self.rows += r.rows
        self.units += 1
        self.tokens += r.tokens
        self.dim = r.dim
        if self.on_progress is not None:
            self.on_progress(CorpusProgress(self.rows, self.rows_todo, self.units, self.units_todo, self.tokens,
                                            time.perf_counter() - self.t0, r))


def _finish(cfg: CorpusConfig, out: Path, record: CorpusRecord, plan: InputPlan, done_before: set[int],
            tally: _Tally, t0: float) -> CorpusSummary:
    now_done = done_units(out, plan)
    missing = [u.index for u in plan.units if u.index not in now_done]
    if missing:
        raise ArtifactError(f"{out}: {len(missing)} units still lack a shard after the run (first: {missing[0]}); "
                            "re-run with --resume")
    wall = time.perf_counter() - t0
    record.status, record.finished = "complete", time.time()
    record.dim = tally.dim if tally.dim is not None else _dim_of_shard(out)
    record.rows_embedded_last_run, record.wall_seconds_last_run = tally.rows, wall
    write_record(out, record)
    write_success(out, record)
    skipped = sum(plan.units[i].rows for i in done_before)
    return CorpusSummary(out, cfg.engine.value, plan.rows_total, tally.rows, skipped, len(plan.units), tally.units,
                         tally.tokens, wall, dim=record.dim, record_path=out / "_corpus.json")


def _dim_of_shard(out: Path) -> int:
    import pyarrow.parquet as pq

    shard = next(iter(sorted(out.glob("part-*.parquet"))))
    return int(pq.read_schema(shard).field("embedding").type.list_size)
