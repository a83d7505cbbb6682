"""Session-wide fixtures shared by every test area: demo models resolved once, artifacts exported once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SFR_EXPORT_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"MTEB data folder {DATA_DIR} not found (set SFR_EXPORT_DATA_DIR)")
    return DATA_DIR


_ARTIFACTS: dict[tuple[str, str], Path] = {}


def exported(tmp_path_factory: pytest.TempPathFactory, model: str, precision: str = "fp32") -> Path:
    """Export ``model`` at ``precision`` once per session; returns the artifact dir (shared across tests)."""
    from sfr_export.artifact import Precision
    from sfr_export.models import resolve_model
    from sfr_export.stages.export import ExportConfig, run_export

    key = (model, precision)
    if key not in _ARTIFACTS:
        # one dir per (model, precision): an fp32-only artifact never gains the fp16 variant of another fixture
        root = tmp_path_factory.getbasetemp() / "artifacts" / f"{model.replace(':', '_')}-{precision}"
        resolved = resolve_model(model)
        if precision != "fp32":  # fp32 first: every other stage builds on it
            run_export(root, resolved, ExportConfig(precision=Precision.FP32))
        run_export(root, resolved, ExportConfig(precision=Precision.parse(precision)))
        _ARTIFACTS[key] = root
    return _ARTIFACTS[key]


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo:tiny-mistral exported to fp32 and fp16 ONNX."""
    root = exported(tmp_path_factory, "demo:tiny-mistral", "fp32")
    return exported(tmp_path_factory, "demo:tiny-mistral", "fp16") or root


@pytest.fixture(scope="session")
def minilm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "demo:minilm", "fp32")


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tmp_path_factory, "demo:smollm2", "fp32")
