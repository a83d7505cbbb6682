"""The verify stage API: the time box, config validation, candidate resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfr_export.errors import UserInputError
from sfr_export.artifact import Artifact, Backend, Precision
from sfr_export.eval.compare import expand_candidates
from sfr_export.stages.verify import VerifyConfig, run_verify


def test_time_budget_drops_the_tasks_the_reference_cannot_reach(eval_artifact: Path, mini_suite: Path,
                                                                tmp_path: Path) -> None:
    cfg = VerifyConfig(suite=str(mini_suite), candidates=("fp32",), cache=False, time_budget_s=1e-3,
                       report_dir=tmp_path)
    res = run_verify(eval_artifact, cfg)
    rep = res.report
    assert [t["name"] for t in rep["suite"]["tasks"]] == ["STSBenchmark"]  # at least one task always runs
    assert [d["task"] for d in rep["suite"]["dropped"]] == ["Banking77Classification", "LegalSummarization",
                                                           "ClusTREC-Covid"]
    assert all("time budget" in d["reason"] for d in rep["suite"]["dropped"])
    assert res.passed and "not run: time budget" in res.markdown


def test_candidate_resolution(eval_artifact: Path) -> None:
    art = Artifact.open(eval_artifact)
    assert expand_candidates(art, None) == ["fp32", "fp16", "int8-cpu"]
    assert expand_candidates(art, ("onnx", "tensorrt")) == ["fp32", "fp16", "int8-cpu", "tensorrt"]
    fp16 = art.resolve("fp16")
    assert not isinstance(fp16, str) and (fp16.backend, fp16.precision) == (Backend.ONNXRUNTIME, Precision.FP16)
    assert "no TensorRT engine" in art.resolve("tensorrt")
    assert "no 'int8' ONNX variant" in art.resolve("int8")
    with pytest.raises(UserInputError, match="unknown candidate 'int4'"):  # a typo is refused before any work
        expand_candidates(art, ("fp32", "int4"))
    with pytest.raises(UserInputError, match="no 'int8' ONNX variant"):  # so is a variant this artifact lacks
        expand_candidates(art, ("int8",))


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="time budget must be > 0"):
        VerifyConfig(time_budget_s=0)
    with pytest.raises(UserInputError, match="candidate list is empty"):
        VerifyConfig(candidates=())
    p = tmp_path / "c.toml"
    p.write_text("[verify]\nsuit = 'quick'\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="unknown keys in table verify"):
        VerifyConfig.from_toml(p)
    p.write_text("[verify]\ncandidates = ['fp16']\n[thresholds.int8]\nmax_delta = 3.5\n", encoding="utf-8")
    cfg = VerifyConfig.from_toml(p, suite="full")
    assert cfg.candidates == ("fp16",) and cfg.suite == "full"
    assert cfg.thresholds_for()["int8"].max_delta == 3.5 and cfg.thresholds_for()["fp32"].max_delta == 0.5
    with pytest.raises(UserInputError, match="does not exist"):
        VerifyConfig.from_toml(tmp_path / "missing.toml")


def test_instruction_table_matches_mteb_task_prompts() -> None:
    """The one instruction table agrees with the prompts in mteb's task metadata (what MTEB's SFR loader uses)."""
    import mteb

    from sfr_export.spec import task_instructions

    for name, t in task_instructions().items():
        if name == "web_search":
            continue
        prompt = mteb.get_task(name).metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get("query")
        if prompt is not None:
            assert t.instruction == prompt, name
        assert t.type in ("sts", "classification", "retrieval", "clustering", "pair_classification")
