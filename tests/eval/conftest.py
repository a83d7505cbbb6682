"""Session fixtures of the eval area: a private copy of the tiny-mistral artifact (fp32 + fp16 ONNX, plus a
deliberately perturbed ONNX variant that must fail the gate), a small suite file, and one shared reference cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sfr_export.artifact import ArtifactRecord, Manifest, StageRecord

HERE = Path(__file__).parent

# A small suite over the shipped quick data: every task type the package ships, a few dozen inputs each.
MINI_SUITE = """
name = "mini"
data = "package"

[[tasks]]
name = "STSBenchmark"
max_pairs = 40

[[tasks]]
name = "Banking77Classification"
max_train_per_label = 2
max_test_per_label = 1

[[tasks]]
name = "LegalSummarization"
max_queries = 8
max_corpus = 24

[[tasks]]
name = "ClusTREC-Covid"
max_labels = 4
max_per_label = 6
"""


def add_noisy_variant(root: Path, name: str = "int8-cpu", scale: float = 0.5, seed: int = 0) -> None:
    """Record an ONNX variant whose weights carry real noise (as the ``int8-cpu`` variant): a genuinely unfaithful
    candidate."""
    import onnx
    from onnx import numpy_helper

    src = root / "onnx" / "fp32" / "model.onnx"
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2 and arr.size > 1000:
            noisy = arr + scale * arr.std() * rng.standard_normal(arr.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    out = root / "onnx" / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    m = Manifest.load(root)
    m.record(StageRecord(stage="calibrate", name=f"calibrate:{name}", config={"variant": name}, variant=name,
                         artifacts=[ArtifactRecord.of(root, out, "onnx")]))


@pytest.fixture(scope="session")
def eval_artifact(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared tiny-mistral artifact (verify writes reports and a manifest record into it)."""
    root = tmp_path_factory.mktemp("eval") / "tiny"
    shutil.copytree(tiny_artifact, root)
    add_noisy_variant(root)
    return root


@pytest.fixture(scope="session")
def mini_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("suite") / "mini.toml"
    p.write_text(MINI_SUITE, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def ref_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("refcache")
