"""Session fixtures for the fine-tuning tests: a small real task mix and one short LoRA run on demo:tiny-mistral."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfr_export.finetune.config import FinetuneConfig
from sfr_export.finetune.data import build_task, write_jsonl


@pytest.fixture(scope="session")
def mix_jsonl(tmp_path_factory) -> Path:
    """16 examples each of STSBenchmark dev, Banking77 train and LegalSummarization's train part."""
    out = tmp_path_factory.mktemp("ftdata") / "train.jsonl"
    examples = []
    for task in ("STSBenchmark", "Banking77Classification", "LegalSummarization"):
        ex, _ = build_task(task, limit=16, negatives=2, seed=0)
        examples += ex
    write_jsonl(out, examples)
    return out


def tiny_config(train_file: Path, output: Path, **train) -> FinetuneConfig:
    return FinetuneConfig.from_dict({
        "model": {"base": "demo:tiny-mistral"},
        "data": {"train": [str(train_file)], "max_query_length": 32, "max_doc_length": 32},
        "sampler": {"batch_size": 4, "seed": 0},
        "loss": {"temperature": 0.05, "hard_negatives": 2},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"output": str(output), "steps": 8, "learning_rate": 3e-3, "warmup_steps": 1, "save_every": 4,
                  "log_every": 4, **train},
    })


@pytest.fixture(scope="session")
def make_tiny_config():
    """``tiny_config`` as a fixture (test modules must not import conftest: another conftest shares the name)."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_run(mix_jsonl, tmp_path_factory):
    """8 optimizer steps with gradient checkpointing, a checkpoint at step 4, adapter + merged model."""
    from sfr_export.finetune.train import train

    out = tmp_path_factory.mktemp("ftrun") / "run"
    cfg = tiny_config(mix_jsonl, out, gradient_checkpointing=True)
    return cfg, train(cfg)
