"""Session fixtures for the low-memory export tests: one fp16 low-memory artifact and one in-process meta trace."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny():
    from sfr_export.models import resolve_model

    return resolve_model("demo:tiny-mistral")


def _export(root: Path, tiny, precision: str):
    from sfr_export.stages.export import ExportConfig, run_export

    rec = run_export(root, tiny, ExportConfig(precision=precision, low_memory="on"))
    return root, rec


@pytest.fixture(scope="session")
def lowmem_fp32(tmp_path_factory, tiny):
    """demo:tiny-mistral exported through the low-memory path in fp32 (validated by the worker)."""
    return _export(tmp_path_factory.mktemp("lowmem-fp32"), tiny, "fp32")


@pytest.fixture(scope="session")
def lowmem_fp16(tmp_path_factory, tiny):
    return _export(tmp_path_factory.mktemp("lowmem-fp16"), tiny, "fp16")


@pytest.fixture(scope="session")
def meta_trace(tiny):
    """(ir model, wrapper, config, index) of demo:tiny-mistral traced on the meta device, weights not attached.

    Tests must leave it as they found it (mapping is read-only; temporary edits are undone).
    """
    from sfr_export.artifact import Precision
    from sfr_export.stages.export_graph import DEFAULT_OPSET
    from sfr_export.stages.lowmem_export import (SafetensorsIndex, build_meta_wrapper, optimize_without_weights,
                                                 trace_graph)

    wrapper, config = build_meta_wrapper(tiny.local_dir, tiny.spec, Precision.FP32)
    model = trace_graph(wrapper, DEFAULT_OPSET)
    optimize_without_weights(model)
    return model, wrapper, config, SafetensorsIndex(tiny.local_dir)
