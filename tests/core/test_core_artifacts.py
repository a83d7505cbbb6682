"""Manifest, checksums, atomic writes, corrupt artifacts, and the CLI's one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from sfr_export.errors import ArtifactError, ChecksumMismatchError, UserInputError
from sfr_export.artifact import Manifest, atomic_path
from sfr_export.models import resolve_model
from sfr_export.runtime import Embedder


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sfr_export.cli", *args], capture_output=True, text=True, timeout=timeout)


def copy_artifact(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_manifest_records_model_spec_stages_and_versions(tiny_artifact):
    m = Manifest.load(tiny_artifact)
    assert m.model["id"] == "demo:tiny-mistral" and len(m.model["fingerprint"]) == 64
    assert m.data["spec"]["pooling"] == "lasttoken"
    rec = m.stage("export:fp32")
    assert rec.config["precision"] == "fp32" and rec.config["variant"] == "fp32"
    assert {"torch", "onnx", "onnxruntime", "transformers"} <= set(rec.versions)
    assert all(len(a.sha256) == 64 and a.bytes > 0 for a in rec.artifacts)
    for name in m.data["stages"]:
        m.verify_stage(name)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_checksum_mismatch_and_truncation_are_detected(tiny_artifact, tmp_path):
    d = copy_artifact(tiny_artifact, tmp_path / "a")
    onnx_path = Manifest.load(d).artifact_path("export:fp32", "onnx")
    data = onnx_path.read_bytes()
    onnx_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumMismatchError, match="truncated"):
        Embedder.from_artifact(d, variant="fp32")
    onnx_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        Embedder.from_artifact(d, variant="fp32")
    # without checksum verification, ORT's own load error still becomes a clear ArtifactError (on CPU the runner
    # opens the GroupQueryAttention form when the export wrote one)
    rec = Manifest.load(d).stage("export:fp32")
    for a in rec.artifacts:
        if a.kind in ("onnx", "onnx-cpu"):
            (d / a.path).write_bytes(b"not an onnx file at all")
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        Embedder.from_artifact(d, variant="fp32", verify=False)


def test_output_dir_of_another_model_is_refused(tiny_artifact):
    other = resolve_model("demo:minilm", compute_fingerprint=False)
    with pytest.raises(UserInputError, match="holds artifacts of model 'demo:tiny-mistral'"):
        Manifest.open_for_model(tiny_artifact, other.manifest_entry())


def test_cli_errors_are_one_line_with_nonzero_exit(tiny_artifact, tmp_path):
    cases = [  # (args, the words naming the problem, exit code: 2 usage/input, 3 artifact)
        (["export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist", 2),
        (["export", "--model", "demo:nope", "--output", str(tmp_path / "o")], "unknown demo model", 2),
        (["export", "--model", "demo:tiny-mistral", "--precision", "int4", "--output", str(tmp_path / "o")],
         "'int4' is not one of", 2),
        (["export", "--model", "demo:minilm", "--output", str(tiny_artifact)], "holds artifacts of model", 2),
        (["embed", str(tiny_artifact), ""], "empty", 2),
        (["inspect", str(tmp_path)], "no manifest.json", 3),
    ]
    for args, needle, code in cases:
        r = run_cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1


def test_cli_corrupt_onnx_data_file(tiny_artifact, tmp_path):
    d = copy_artifact(tiny_artifact, tmp_path / "c")
    m = Manifest.load(d)
    p = m.artifact_path("export:fp16", "onnx")
    p.write_bytes(p.read_bytes()[:1000])
    r = run_cli("embed", str(d), "hello", "--variant", "fp16")
    assert r.returncode == 3 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_cli_export_embed_inspect_and_resume(tmp_path):
    out = tmp_path / "tiny"
    r = run_cli("build", "--model", "demo:tiny-mistral", "--precision", "fp32", "--no-verify", "--output", str(out))
    assert r.returncode == 0, r.stderr
    first = Manifest.load(out).stage("export:fp32").created
    r = run_cli("build", "--model", "demo:tiny-mistral", "--precision", "fp32", "--no-verify", "--output", str(out))
    assert r.returncode == 0 and Manifest.load(out).stage("export:fp32").created == first  # resumed, not redone
    r = run_cli("embed", str(out), "A man plays guitar.", "Someone plays an instrument.", "--similarity")
    assert r.returncode == 0, r.stderr
    sims = json.loads(r.stdout)["similarity"]
    assert abs(sims[0][0] - 1.0) < 1e-4 and len(sims) == 2
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and json.loads(r.stdout)["model"]["id"] == "demo:tiny-mistral"
