"""Failures never destroy good state: a verify run that errors (not the gate's verdict) leaves the previous reports
and the manifest's verify stage as they were and records the failure beside them; a bad argument writes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reliability_helpers import run_cli
from sfr_export.artifact import Manifest
from sfr_export.errors import ArtifactError, UserInputError
from sfr_export.eval.gate import ThresholdOverrides
from sfr_export.stages.verify import REPORT_SUBDIR, VerifyConfig, run_verify

CFG = VerifyConfig(reference="fp32", candidates=("fp16",), cache=False)


def _reports(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / REPORT_SUBDIR).iterdir())}


def test_an_erroring_verify_keeps_the_good_report_and_records_the_failure(artifact_copy: Path) -> None:
    good = run_verify(artifact_copy, CFG)
    assert good.passed
    reports = _reports(artifact_copy)
    stage = Manifest.load(artifact_copy).data["stages"]["verify:quick"]

    # a typo: refused before any work, and nothing is written (not even a failure record)
    manifest_bytes = (artifact_copy / "manifest.json").read_bytes()
    with pytest.raises(UserInputError, match="'int4'"):
        run_verify(artifact_copy, VerifyConfig(reference="fp32", candidates=("int4",), cache=False))
    assert (artifact_copy / "manifest.json").read_bytes() == manifest_bytes
    res = run_cli("verify", str(artifact_copy), "--candidates", "int4")
    assert res.rc == 2 and "'int4'" in res.one_error()
    assert (artifact_copy / "manifest.json").read_bytes() == manifest_bytes
    assert _reports(artifact_copy) == reports

    # an error in the middle of the run (the candidate's ONNX is damaged): the old state stays, the failure is beside it
    onnx = artifact_copy / "onnx" / "fp16" / "model.onnx"
    os.truncate(onnx, 100)
    with pytest.raises(ArtifactError, match="onnx/fp16/model.onnx"):
        run_verify(artifact_copy, CFG)
    m = Manifest.load(artifact_copy)
    assert m.data["stages"]["verify:quick"] == stage
    assert "onnx/fp16/model.onnx" in m.failures["verify:quick"]["reason"]
    assert _reports(artifact_copy) == reports
    m.verify_stage("verify:quick")  # the recorded reports still match their checksums


def test_a_gate_verdict_is_recorded_and_a_later_pass_clears_the_failure(artifact_copy: Path) -> None:
    m = Manifest.load(artifact_copy)
    m.record_failure("verify:quick", "an earlier run crashed")
    failing = VerifyConfig(reference="fp32", candidates=("fp16",), cache=False,  # fp16 is not bit-exact to fp32
                           overrides=ThresholdOverrides(min_p1_cosine=1.0, max_delta=0.0))
    res = run_verify(artifact_copy, failing, raise_on_fail=False)
    assert not res.passed
    rec = Manifest.load(artifact_copy).stage("verify:quick")
    assert rec is not None and rec.status.value == "failed-targets"  # a verdict is a result, recorded as such
    assert run_verify(artifact_copy, CFG).passed
    m = Manifest.load(artifact_copy)
    assert m.stage("verify:quick").status.value == "ok" and "verify:quick" not in m.failures
