"""A service that only serves needs the core install plus [serve]: no torch, no transformers.

A fresh venv gets ``pip install 'sfr-export[serve]'`` (from this checkout, not editable), loads an artifact built by
the main venv, embeds, serves one request, and proves that torch and transformers were never imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfr_export.runtime import Embedder

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["A man is playing a guitar.", "The spike protein binds ACE2."]

SCRIPT = r"""
import json, sys
import numpy as np
from fastapi.testclient import TestClient
from sfr_export.runtime import Embedder
from sfr_export.serve import create_app

emb = Embedder.from_artifact(sys.argv[1], backend="onnxruntime", variant="fp32")
vecs = emb.encode(json.loads(sys.argv[2]))
with TestClient(create_app(emb)) as client:
    r = client.post("/v1/embeddings", json={"input": json.loads(sys.argv[2]), "model": "m"})
served = [d["embedding"] for d in r.json()["data"]]
print(json.dumps({"status": r.status_code, "vecs": vecs.tolist(), "served": served,
                  "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def _du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


@pytest.mark.slow
def test_runtime_and_server_without_torch(tiny_artifact: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[serve]"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True).stdout
    names = {d["name"].lower() for d in json.loads(installed)}
    assert not names & {"torch", "transformers", "onnx", "onnxscript"}, names
    out = subprocess.run([str(py), "-c", SCRIPT, str(tiny_artifact), json.dumps(TEXTS)], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["status"] == 200
    ref = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant="fp32").encode(TEXTS)
    np.testing.assert_allclose(np.array(got["vecs"]), ref, atol=1e-6)
    np.testing.assert_allclose(np.array(got["served"]), ref, atol=1e-6)
    print(f"torch-free venv: {_du_mb(venv):.0f} MB")
