"""Artifact damage: each file of a tiny output dir is truncated, has a byte flipped, is deleted, or cannot be read.
``inspect``, ``embed``, ``verify``, ``serve`` (subprocesses) and ``Embedder.from_artifact`` then each fail with one line
naming the file, and a plain ``export`` (``--force`` too) restores spec.json and tokenizer/.

"Cannot be read" is done by putting a directory where the file was: these tests run as root in CI, and
``chmod 000`` does not stop root from reading (that case runs only as another user).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reliability_helpers import CliResult, run_cli
from sfr_export import Embedder
from sfr_export.artifact import Manifest
from sfr_export.errors import ArtifactError

ONNX = ["onnx/fp32/model.onnx", "onnx/fp16/model.onnx", "onnx/fp32/model.cpu.onnx", "onnx/fp16/model.cpu.onnx"]
BASE = ["spec.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
FILES = ONNX + BASE + ["manifest.json"]
KINDS = ["truncate", "flip-byte", "delete", "unreadable-dir", "chmod-000"]
IS_ROOT = os.geteuid() == 0


def damage(path: Path, kind: str) -> None:
    if kind == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif kind == "flip-byte":
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0xFF]))
    elif kind == "delete":
        path.unlink()
    elif kind == "unreadable-dir":  # open() fails with EISDIR, for root too
        path.unlink()
        path.mkdir()
    elif kind == "chmod-000":
        path.chmod(0)
    else:  # pragma: no cover
        raise ValueError(kind)


def test_the_table_covers_every_recorded_file(tiny_artifact: Path) -> None:
    """Every file the manifest records (no external data: the tiny model's ONNX is under 2 GiB) is in FILES."""
    m = Manifest.load(tiny_artifact)
    recorded = {a.path for a in m.base_files} | {a.path for r in m.stages.values() for a in r.artifacts}
    assert recorded | {"manifest.json"} == set(FILES)


def _variant_of(rel: str) -> str:
    return "fp16" if "fp16" in rel else "fp32"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rel", FILES)
def test_damaged_file_is_named_in_one_line(artifact_copy: Path, rel: str, kind: str) -> None:
    if kind == "chmod-000" and IS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see unreadable-dir)")
    target = artifact_copy / rel
    damage(target, kind)
    named = rel if rel != "manifest.json" else "manifest.json"
    variant = _variant_of(rel)
    runs = {"inspect": ["inspect", str(artifact_copy)],
            "embed": ["embed", str(artifact_copy), "hello", "--variant", variant],
            # the damaged variant is the reference: it is opened first, so the run stops there
            "verify": ["verify", str(artifact_copy), "--reference", variant, "--candidates",
                       "fp32" if variant == "fp16" else "fp16", "--no-cache"],
            # a server that started would run until the timeout: it must refuse to start
            "serve": ["serve", str(artifact_copy), "--variant", variant, "--port", "0"]}
    with ThreadPoolExecutor(4) as pool:
        results: dict[str, CliResult] = dict(zip(runs, pool.map(lambda a: run_cli(*a, timeout=120), runs.values())))
    for cmd, res in results.items():
        line = res.one_error()
        assert named in line, f"{cmd}: {named} not named in: {line}"
        assert res.rc == 3, f"{cmd}: exit {res.rc}: {line}"
    with pytest.raises(ArtifactError, match=named.replace(".", r"\.")):
        Embedder.from_artifact(artifact_copy, backend="onnxruntime", variant=variant)


@pytest.mark.parametrize("kind", ["truncate", "flip-byte", "delete", "unreadable-dir"])
@pytest.mark.parametrize("rel", BASE)
def test_export_restores_spec_and_tokenizer(artifact_copy: Path, rel: str, kind: str) -> None:
    """What a plain `export` runs first (`prepare_output`) restores a damaged spec/tokenizer file; then the whole
    artifact checks out again."""
    from sfr_export.models import resolve_model
    from sfr_export.stages.common import prepare_output

    target = artifact_copy / rel
    damage(target, kind)
    if kind == "unreadable-dir" and rel == "spec.json":
        shutil.rmtree(target)  # a dir named spec.json is the user's to remove (tokenizer/ is replaced whole)
    prepare_output(artifact_copy, resolve_model("demo:tiny-mistral"))
    m = Manifest.load(artifact_copy)
    m.verify_base()
    for name in m.stages:
        m.verify_stage(name)
    Embedder.from_artifact(artifact_copy, backend="onnxruntime", variant="fp32").close()


def test_export_force_restores_a_truncated_tokenizer(artifact_copy: Path) -> None:
    damage(artifact_copy / "tokenizer" / "tokenizer.json", "truncate")
    res = run_cli("export", "-m", "demo:tiny-mistral", "-o", str(artifact_copy), "--force", "--no-validate")
    assert res.rc == 0, res.output
    assert "Traceback" not in res.output
    ok = run_cli("inspect", str(artifact_copy))
    assert ok.rc == 0, ok.output
