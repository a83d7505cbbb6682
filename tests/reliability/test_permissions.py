"""Files and dirs follow the umask, like any other tool's output: under umask 022 files are 0644 and dirs 0755
(manifest, spec, tokenizer/, onnx/, reports, the demo model cache)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from reliability_helpers import cli_cmd, cli_env, umask022 as _umask022


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        if p.name == ".sfr-export.lock" or p.is_symlink():
            continue
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def _assert_022(root: Path, modes: dict[str, int]) -> None:
    wrong = {k: oct(v) for k, v in modes.items() if v != (0o755 if (root / k).is_dir() else 0o644)}
    assert not wrong, f"not 0644/0755 under umask 022: {wrong}"


def test_built_and_verified_artifact_is_0644_0755(raced_build) -> None:
    """The dir the build race wrote under umask 022 (test_concurrency's fixture), then its verify reports."""
    out, _ = raced_build
    res = subprocess.run(cli_cmd("verify", str(out), "--reference", "fp32", "--candidates", "fp32", "--no-cache"),
                         capture_output=True, text=True, env=cli_env(), preexec_fn=_umask022, timeout=600)
    assert res.returncode == 0, res.stderr
    modes = _modes(out)
    for must in ("manifest.json", "spec.json", "tokenizer", "tokenizer/tokenizer.json", "onnx", "onnx/fp32",
                 "onnx/fp32/model.onnx", "reports", "reports/verify", "reports/verify/report.json",
                 "reports/verify/report.md", "reports/verify/report.html"):
        assert must in modes, f"{must} missing: {sorted(modes)}"
    _assert_022(out, modes)


def test_demo_model_cache_is_0644_0755(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    code = "from sfr_export.models.demo import materialize_demo; materialize_demo('demo:tiny-mistral')"
    res = subprocess.run([*cli_cmd()[:1], "-c", code], capture_output=True, text=True, preexec_fn=_umask022,
                         env=cli_env(SFR_EXPORT_CACHE=str(cache)), timeout=600)
    assert res.returncode == 0, res.stderr
    demo = cache / "demo"
    modes = _modes(demo)
    assert "tiny-mistral-v1/model.safetensors" in modes
    _assert_022(demo, modes)
