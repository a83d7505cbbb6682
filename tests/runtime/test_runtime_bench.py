"""`sfr-export bench` runs every candidate in its own process and writes JSON + PNG (a smoke run, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sfr_export.artifact import Artifact
from sfr_export.bench import BenchConfig, label, parse_candidate
from sfr_export.errors import UserInputError


def test_bench_command_writes_json_png_and_ratios(tiny_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "sfr_export.cli", "bench", str(tiny_artifact), "--batch-sizes", "1,2",
                           "--seq-lens", "8", "--candidates", "torch:fp32,onnxruntime:fp32", "--cell-seconds", "0.05",
                           "--min-iters", "1", "--max-iters", "2", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["model"] == "demo:tiny-mistral"
    by = {r["candidate"]: r for r in report["results"]}
    assert set(by) == {"torch fp32", "ort fp32"}
    for r in by.values():
        assert [(c["batch"], c["seq"]) for c in r["cells"]] == [(1, 8), (2, 8)]
        assert all(c["tokens_per_s"] > 0 and c["p99_ms"] >= c["p50_ms"] > 0 for c in r["cells"])
        assert r["peak_rss_mb"] > 50 and r["model_bytes"] > 1_000_000
    assert all(c["speedup_vs_torch_fp32"] == 1.0 for c in by["torch fp32"]["cells"])
    assert by["ort fp32"]["info"]["runner"]["providers"] == ["CPUExecutionProvider"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| ort fp32 | 2 | 8 |" in proc.stdout


def test_candidates_follow_the_manifest(tiny_artifact: Path) -> None:
    labels = [label(c) for c in Artifact.open(tiny_artifact).candidates(runnable_only=True)]
    assert labels[:3] == ["torch fp32", "ort fp32", "ort fp16"]
    assert "tensorrt" not in " ".join(labels)  # no engine stage in this artifact


def test_bench_config_and_candidate_validation(tiny_artifact: Path) -> None:
    art = Artifact.open(tiny_artifact)
    with pytest.raises(UserInputError):
        BenchConfig(batch_sizes=(0,))
    with pytest.raises(UserInputError, match="must look like"):
        parse_candidate("jax:fp32", art)
    with pytest.raises(UserInputError, match="no 'int8-cpu' ONNX variant"):
        parse_candidate("onnxruntime:int8-cpu", art)  # refused before any process starts
    assert label(parse_candidate("onnxruntime:fp16", art)) == "ort fp16"
