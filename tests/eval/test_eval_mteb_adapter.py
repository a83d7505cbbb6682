"""The mteb encoder adapter on mteb's own offline mock tasks (no hub access): one task per type we evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

MOCKS = ["MockSTSTask", "MockClassificationTask", "MockRetrievalTask", "MockClusteringTask",
         "MockPairClassificationTask"]


@pytest.fixture(scope="module")
def encoder(eval_artifact: Path):
    from sfr_export.eval.mteb_adapter import MtebEncoder
    from sfr_export.runtime import Embedder

    enc = MtebEncoder(Embedder.from_artifact(eval_artifact, backend="onnxruntime", variant="fp32"), name="test/tiny")
    yield enc
    enc.embedder.close()


def test_adapter_satisfies_the_encoder_protocol(encoder) -> None:
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(encoder, EncoderProtocol)
    assert encoder.mteb_model_meta.name == "test/tiny"


def test_mock_tasks_run_offline(encoder) -> None:
    import mteb
    from mteb.mocks.mock_run import get_compatible_mock_tasks

    tasks = [t for t in get_compatible_mock_tasks(encoder) if type(t).__name__ in MOCKS]
    assert len(tasks) == len(MOCKS)
    res = mteb.evaluate(encoder, tasks, cache=None, raise_error=True, show_progress_bar=False)
    scores = {r.task_name: r.get_score() for r in res.task_results}
    assert len(scores) == len(MOCKS)
    assert all(np.isfinite(v) for v in scores.values())


def test_prompts_follow_the_sfr_loader(encoder) -> None:
    """Documents get no instruction, queries get the task's (our table, else mteb's task metadata)."""
    import mteb
    from mteb.types import PromptType

    trec = mteb.get_task("TRECCOVID").metadata
    assert encoder._prompt_args(trec, PromptType.document) == {"prompt": None, "instruction": None, "side": "document"}
    assert encoder._prompt_args(trec, PromptType.query)["prompt"] == "TRECCOVID"
    other = mteb.get_task("SciFact").metadata  # not in sfr-export's table: mteb's own task prompt
    args = encoder._prompt_args(other, PromptType.query)
    assert args["prompt"] is None and args["instruction"] == other.prompt["query"]
    # the instruction really reaches the token ids of queries only
    emb = encoder.embedder
    q = emb.tokenize(["masks reduce transmission"], prompt="TRECCOVID", side="query").ids[0]
    d = emb.tokenize(["masks reduce transmission"], prompt="TRECCOVID", side="document").ids[0]
    assert len(q) > len(d)
