"""`sfr-export build` runs a quick verify at the end: the gate decides the exit code; --no-verify skips it.
The suite comes from $SFR_EXPORT_VERIFY_CONFIG (a verify TOML), here the small test suite, to keep CI fast."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sfr_export.artifact import Manifest

from eval_clirun import run_cli


@pytest.fixture()
def build_dir(tiny_artifact: Path, tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, root)  # fp32 + fp16 already exported: build resumes them
    for rec in ("verify:mini", "verify:quick"):
        assert Manifest.load(root).stage(rec) is None
    return root


def config(path: Path, suite: Path, cache: Path, extra: str = "") -> Path:
    path.write_text(f'[verify]\nsuite = "{suite}"\ncache_dir = "{cache}"\n{extra}', encoding="utf-8")
    return path


def test_build_verifies_and_records(build_dir: Path, mini_suite: Path, ref_cache_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFR_EXPORT_VERIFY_CONFIG", str(config(tmp_path / "v.toml", mini_suite, ref_cache_dir)))
    res = run_cli("build", "--model", "demo:tiny-mistral", "--precision", "fp16", "--output", build_dir)
    assert res.code == 0, res.stderr
    rec = Manifest.load(build_dir).stage("verify:mini")
    assert rec is not None and rec.status == "ok"
    assert {"fp32", "fp16"} <= set(rec.figures["candidates"])
    assert (build_dir / "reports" / "verify" / "report.md").read_text(encoding="utf-8").startswith("## sfr-export verify: PASS")


def test_build_fails_with_one_line_when_the_gate_fails(build_dir: Path, mini_suite: Path, ref_cache_dir: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = config(tmp_path / "strict.toml", mini_suite, ref_cache_dir, "\n[thresholds.fp16]\nmin_p1_cosine = 1.0\n")
    monkeypatch.setenv("SFR_EXPORT_VERIFY_CONFIG", str(strict))
    res = run_cli("build", "--model", "demo:tiny-mistral", "--precision", "fp16", "--output", build_dir)
    assert res.code == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "fidelity gate failed: fp16 on " in errors[0] and "p1 cosine" in errors[0]
    rec = Manifest.load(build_dir).stage("verify:mini")
    assert rec is not None and rec.status == "failed-targets"  # the failed verify is recorded before the exit

    res = run_cli("build", "--model", "demo:tiny-mistral", "--precision", "fp16", "--no-verify", "--output", build_dir)
    assert res.code == 0, res.stderr
