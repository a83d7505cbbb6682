"""scripts/gpu_check.sh is prepared for a GPU machine; its --dry-run runs the same code paths here on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_passing_json(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed (pip install 'sfr-export[kernels]')")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["passed"] and data["mode"].startswith("dry-run") and not data["errors"]
    for sec in ("fidelity_tiny", "fidelity_full_width_2layer", "kernel", "throughput_tiny", "throughput_full_width_2layer"):
        assert "seconds" in data[sec], (sec, data[sec])
    assert data["kernel"]["bf16"]["max_abs"] < 1e-5
    assert data["throughput_full_width_2layer"]["tokens_per_s"] > 0
    assert len(data["checks"]) == 11 and all(c["pass"] for c in data["checks"].values())


def test_gpu_check_refuses_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("a GPU is visible: the real check would run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr and not (tmp_path / "gpu_check.json").exists()
