"""Fine-tuning commands: ``finetune-data`` (build JSONL from MTEB folders), ``mine`` (teacher hard negatives),
``finetune`` (LoRA training from one TOML config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..artifact import Backend
from ..errors import TrainingError
from ._ui import parse_csv, print_json

DEFAULT_TASKS = "STSBenchmark,Banking77Classification,ClusTREC-Covid,TRECCOVID,LegalSummarization"


def _parse_window(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(":"))
    except ValueError:
        raise TrainingError(f"--rank-window must look like START:END (e.g. 30:100), got {value!r}") from None
    return lo, hi


def finetune_data(
    tasks: str = typer.Option(DEFAULT_TASKS, help="Comma-separated task folders of the data dir."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write."),
    data_dir: Optional[Path] = typer.Option(None, help="MTEB-format data dir (default: $SFR_EXPORT_DATA_DIR or ../shared/data)."),
    limit: Optional[int] = typer.Option(None, help="At most this many examples per task (seeded sample)."),
    negatives: int = typer.Option(7, help="Label negatives per classification / clustering example."),
    heldout_fraction: float = typer.Option(0.3, help="Share of retrieval queries / clustering docs kept out of training."),
    seed: int = typer.Option(0),
) -> None:
    """Build fine-tuning JSONL from train/dev splits (never test); retrieval corpora go to OUTPUT.corpus/."""
    from ..finetune.data import build_task, corpus_dir_for, data_root, write_corpus, write_jsonl

    root = data_dir or data_root()
    examples, summary = [], {}
    for task in parse_csv(tasks, name="--tasks"):
        ex, corpus = build_task(task, root=root, limit=limit, negatives=negatives,
                                heldout_fraction=heldout_fraction, seed=seed)
        if not ex:
            raise TrainingError(f"task {task} produced no examples")
        examples.extend(ex)
        summary[task] = {"examples": len(ex), "type": ex[0].type}
        if corpus is not None:
            path = corpus_dir_for(output) / f"{task}.jsonl"
            write_corpus(path, corpus)
            summary[task]["corpus"] = str(path)
    n = write_jsonl(output, examples)
    print_json({"output": str(output), "examples": n, "tasks": summary})


def mine(
    input: Path = typer.Option(..., "--input", "-i", help="Fine-tuning JSONL."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL with mined negatives."),
    config: Optional[Path] = typer.Option(None, help="TOML config; its [mining] and [model] sections are used."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: model (hub id, dir, demo:NAME) or artifact dir."),
    backend: Optional[Backend] = typer.Option(None, case_sensitive=False, help="Artifact teacher backend."),
    rank_window: Optional[str] = typer.Option(None, help="Teacher ranks to sample from, START:END (default 30:100)."),
    negatives: Optional[int] = typer.Option(None, help="Negatives per example (default 7)."),
    false_negative_ratio: Optional[float] = typer.Option(None, help="Drop candidates above ratio x positive score."),
    corpus: list[str] = typer.Option([], help="TASK=PATH extra corpus (JSONL with 'text'); repeatable."),
    on_bad_line: str = typer.Option("stop", help="stop | skip"),
) -> None:
    """Mine hard negatives for retrieval / STS examples with a teacher embedder."""
    import dataclasses

    from ..finetune.config import FinetuneConfig
    from ..finetune.data import assemble_corpora, read_jsonl, write_jsonl
    from ..finetune.mining import load_teacher, mine_hard_negatives

    cfg = FinetuneConfig.from_toml(config) if config else FinetuneConfig()
    changes = {"teacher": teacher, "backend": backend.value if backend else None, "negatives": negatives,
               "false_negative_ratio": false_negative_ratio,
               "rank_window": _parse_window(rank_window) if rank_window else None}
    mcfg = dataclasses.replace(cfg.mining, **{k: v for k, v in changes.items() if v is not None})
    loaded = read_jsonl(input, on_bad_line=on_bad_line)
    corpora = assemble_corpora(input, corpus, {ex.task for ex in loaded.examples})
    teacher_emb = load_teacher(mcfg.teacher or cfg.model.base, backend=mcfg.backend, max_length=mcfg.max_length,
                               batch_size=mcfg.batch_size)
    mined, report = mine_hard_negatives(loaded.examples, teacher_emb, mcfg, corpora=corpora)
    write_jsonl(output, mined)
    print_json({"output": str(output), "examples": len(mined), "skipped_lines": [n for n, _ in loaded.skipped],
                "mined": report.mined, "short": report.short, "corpus_sizes": report.corpus_sizes,
                "dropped_false_negatives": report.dropped_false_negatives,
                "rank_window": list(mcfg.rank_window), "teacher": mcfg.teacher or cfg.model.base})


def finetune(config: Path = typer.Option(..., "--config", "-c", help="TOML config (see sfr_export/finetune/config.py).")
             ) -> None:
    """LoRA contrastive fine-tuning (SFR recipe). Under torchrun / accelerate launch it runs data-parallel."""
    from ..finetune.config import FinetuneConfig
    from ..finetune.train import train

    res = train(FinetuneConfig.from_toml(config))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    print_json({"output": str(res.output), "steps": res.steps, "resumed_from": res.resumed_from,
                "loss_first": res.losses[0] if res.losses else None,
                "loss_last": res.losses[-1] if res.losses else None,
                "examples_per_s": round(res.examples_per_s, 3), "tokens_per_s": round(res.tokens_per_s, 1),
                "adapter": str(res.adapter_dir), "merged": str(res.merged_dir) if res.merged_dir else None})


COMMANDS = {"finetune-data": finetune_data, "mine": mine, "finetune": finetune}
