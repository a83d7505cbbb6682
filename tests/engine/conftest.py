"""Session fixtures of the engine tests: the shared fp32 export of demo:tiny-mistral (tests/conftest.py) and its
weight-only int8 Q/DQ form."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model():
    from sfr_export.models.loading import resolve_model

    return resolve_model("demo:tiny-mistral")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    from tests.conftest import exported

    return exported(tmp_path_factory, "demo:tiny-mistral", "fp32")


@pytest.fixture(scope="session")
def tiny_int8_onnx(tiny_export, tmp_path_factory) -> Path:
    from engine_qdq_graphs import weight_only_int8

    out = tmp_path_factory.mktemp("int8") / "model.onnx"
    info = weight_only_int8(str(tiny_export / "onnx" / "fp32" / "model.onnx"), str(out))
    assert info["weights_quantized"] >= 14  # 2 layers x (q, k, v, o, gate, up, down)
    return out


@pytest.fixture()
def artifact_copy(tiny_export, tmp_path) -> Path:
    """A private copy of the session export, for tests that add stages to its manifest."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_export, dst)
    return dst
