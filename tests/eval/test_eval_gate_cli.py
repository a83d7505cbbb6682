"""`sfr-export verify` through the real CLI: gate pass/fail with exit codes, skipped candidates, thresholds from
flags and config files, bad input, the reports (schema, markdown, HTML, JUnit), the manifest record, the cache."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sfr_export.artifact import Manifest

from eval_clirun import CliResult, run_cli


@pytest.fixture(scope="module")
def ref_cache_dir(tmp_path_factory) -> Path:
    """A cache of this module's own, so the first run below starts cold whatever ran before in the session."""
    return tmp_path_factory.mktemp("gate-refcache")


@pytest.fixture(scope="module")
def failing_run(eval_artifact: Path, mini_suite: Path, ref_cache_dir: Path, tmp_path_factory) -> tuple[CliResult, Path]:
    out = tmp_path_factory.mktemp("fail")
    res = run_cli("verify", eval_artifact, "--suite", mini_suite, "--candidates", "fp32,fp16,int8-cpu,tensorrt",
                  "--cache-dir", ref_cache_dir, "--junit", out / "junit.xml", "--report-dir", out)
    return res, out


@pytest.fixture(scope="module")
def passing_run(eval_artifact: Path, mini_suite: Path, ref_cache_dir: Path, failing_run) -> tuple[CliResult, Path]:
    # runs after failing_run: same reference cache, so the reference side comes from the cache
    res = run_cli("verify", eval_artifact, "--suite", mini_suite, "--candidates", "fp32,fp16,tensorrt",
                  "--cache-dir", ref_cache_dir, "--junit", eval_artifact / "junit.xml")
    return res, eval_artifact / "reports" / "verify"


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_gate_fails_with_exit_1_naming_worst_task_and_candidate(failing_run) -> None:
    res, out = failing_run
    assert res.code == 1
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "fidelity gate failed: int8-cpu on " in lines[0]
    rep = report(out)
    assert rep["gate"]["passed"] is False and rep["gate"]["reason"] in lines[0]
    by_name = {c["name"]: c for c in rep["candidates"]}
    assert by_name["int8-cpu"]["passed"] is False and by_name["int8-cpu"]["cosine"]["mean"] < 0.99
    assert by_name["fp32"]["passed"] and by_name["fp16"]["passed"]
    worst_task = rep["gate"]["reason"].split("int8-cpu on ")[1].split(":")[0]
    assert worst_task in {t["name"] for t in rep["suite"]["tasks"]}


def test_gate_passes_with_exit_0(passing_run) -> None:
    res, out = passing_run
    assert res.code == 0, res.stderr
    assert "## sfr-export verify: PASS" in res.stdout
    rep = report(out)
    assert rep["gate"] == {"passed": True, "reason": None}
    fp32 = next(c for c in rep["candidates"] if c["name"] == "fp32")
    assert fp32["cosine"]["mean"] > 0.9999 and all(abs(t["delta"]) <= 0.5 for t in fp32["tasks"])
    retrieval = next(t for t in fp32["tasks"] if t["type"] == "retrieval")
    assert retrieval["top10_overlap"] == pytest.approx(1.0)


def test_reports_are_recorded_in_the_manifest(eval_artifact: Path, passing_run) -> None:
    m = Manifest.load(eval_artifact)
    rec = m.stage("verify:mini")
    assert rec is not None and rec.status == "ok"  # the passing run is the latest one recorded so far
    kinds = {a.kind for a in rec.artifacts}
    assert kinds == {"report-json", "report-md", "report-html", "report-junit"}
    m.verify_stage("verify:mini")  # sha256 of every report matches
    assert rec.figures["candidates"]["tensorrt"]["status"] == "skipped"


def test_unavailable_candidates_are_skipped_with_reason_not_passed(failing_run) -> None:
    rep = report(failing_run[1])
    by_name = {c["name"]: c for c in rep["candidates"]}
    assert by_name["tensorrt"]["status"] == "skipped" and "TensorRT" in by_name["tensorrt"]["reason"]
    assert "passed" not in by_name["tensorrt"]


def test_only_unavailable_candidates_fail_the_gate(eval_artifact: Path, mini_suite: Path, ref_cache_dir: Path,
                                                   tmp_path: Path, passing_run) -> None:
    res = run_cli("verify", eval_artifact, "--suite", mini_suite, "--candidates", "tensorrt", "--cache-dir",
                  ref_cache_dir, "--report-dir", tmp_path)
    assert res.code == 1 and "no candidate could be evaluated (tensorrt: " in res.stderr


def test_reference_cache_serves_the_second_run(failing_run, passing_run) -> None:
    first, second = report(failing_run[1])["reference"], report(passing_run[1])["reference"]
    n_tasks = len(report(passing_run[1])["suite"]["tasks"])
    assert first["cache"]["misses"] == n_tasks and first["cache"]["hits"] == 0
    assert second["cache"]["hits"] == n_tasks and second["cache"]["misses"] == 0
    # identical reference scores from cached embeddings
    assert report(failing_run[1])["reference_scores"] == report(passing_run[1])["reference_scores"]


def test_report_json_follows_the_schema(failing_run, passing_run) -> None:
    from sfr_export.eval.report import SCHEMA_VERSION, validate_report

    for _, out in (failing_run, passing_run):
        rep = report(out)
        validate_report(rep)
        assert rep["schema_version"] == SCHEMA_VERSION
    bad = report(passing_run[1])
    del bad["gate"]
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        validate_report(bad)


def test_markdown_is_short_and_html_self_contained(failing_run) -> None:
    out = failing_run[1]
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("## sfr-export verify: FAIL") and len(md.splitlines()) < 40
    assert "| int8-cpu | **FAIL**" in md and "skipped: " in md
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("<svg") == 3 + 1  # a histogram per evaluated candidate + the task-score bars
    for external in ("<script", "src=", "<link", "@import", "url("):
        assert external not in html


def test_junit_has_one_case_per_task_and_candidate(failing_run) -> None:
    rep = report(failing_run[1])
    root = ET.parse(failing_run[1] / "junit.xml").getroot()
    tasks = [t["name"] for t in rep["suite"]["tasks"]]
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {f"verify.{n}" for n in ("fp32", "fp16", "int8-cpu", "tensorrt")}
    for name, s in suites.items():
        cases = s.findall("testcase")
        assert [c.get("name") for c in cases] == tasks + ["embedding-cosine"]
        assert int(s.get("tests")) == len(cases)
    assert all(c.find("skipped") is not None for c in suites["verify.tensorrt"].findall("testcase"))
    assert int(suites["verify.int8-cpu"].get("failures")) >= 1
    assert int(suites["verify.fp32"].get("failures")) == 0 and int(suites["verify.fp32"].get("skipped")) == 0
    assert int(root.get("tests")) == 4 * (len(tasks) + 1)


def test_config_file_thresholds_and_cli_override(eval_artifact: Path, mini_suite: Path, ref_cache_dir: Path,
                                                 tmp_path: Path, passing_run) -> None:
    cfg = tmp_path / "verify.toml"
    cfg.write_text(f'[verify]\nsuite = "{mini_suite}"\ncandidates = ["fp16"]\ncache_dir = "{ref_cache_dir}"\n'
                   f'report_dir = "{tmp_path / "r"}"\n\n[thresholds.fp16]\nmin_p1_cosine = 1.0\n', encoding="utf-8")
    res = run_cli("verify", eval_artifact, "--config", cfg)
    assert res.code == 1 and "fp16" in res.stderr and "p1 cosine" in res.stderr
    res = run_cli("verify", eval_artifact, "--config", cfg, "--min-p1-cosine", "0.9")
    assert res.code == 0, res.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--min-mean-cosine", "1.5", "must be a cosine in [-1, 1]"),
    ("--min-p1-cosine", "-2", "must be a cosine in [-1, 1]"),
    ("--max-delta", "-1", "within [0, 100]"),
    ("--max-delta", "250", "within [0, 100]"),
])
def test_thresholds_out_of_range(eval_artifact: Path, flag: str, value: str, message: str) -> None:
    res = run_cli("verify", eval_artifact, flag, value)
    assert res.code == 2 and message in res.stderr


def test_bad_config_and_suite_inputs(eval_artifact: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[thresholds.fp64]\nmax_delta = 1\n", encoding="utf-8")
    res = run_cli("verify", eval_artifact, "--config", cfg)
    assert res.code == 2 and "table thresholds.fp64 is not a precision" in res.stderr
    empty = tmp_path / "empty.toml"
    empty.write_text('name = "empty"\ntasks = []\n', encoding="utf-8")
    res = run_cli("verify", eval_artifact, "--suite", empty)
    assert res.code == 2 and "lists no tasks" in res.stderr
    res = run_cli("verify", eval_artifact, "--suite", "full", "--data-dir", tmp_path / "nowhere")
    assert res.code == 2 and "does not exist" in res.stderr
    res = run_cli("verify", tmp_path)
    assert res.code == 3 and "manifest.json" in res.stderr  # not an output dir: an artifact error
