import numpy as np
import onnxruntime as ort
import pytest

from sfr_export.errors import BackendUnavailableError, UserInputError
from sfr_export.artifact import Manifest
from sfr_export.runtime import Embedder
from sfr_export.runtime.ort_runner import OrtRunner, check_providers


TEXTS = ["tiny", "a somewhat longer sentence about guitars and music", "mid length words here",
         "the longest text of them all, " * 6, "x y"]


def test_encode_returns_input_order_and_is_batch_invariant(tiny_artifact):
    e = Embedder.from_artifact(tiny_artifact, backend="onnxruntime")
    full = e.encode(TEXTS, batch_size=32)
    assert full.dtype == np.float32 and full.shape == (5, 64)
    assert np.allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([e.encode([t])[0] for t in TEXTS])
    assert np.allclose(full, one_by_one, atol=1e-5)
    assert np.allclose(e.encode(TEXTS, batch_size=2), full, atol=1e-5)
    assert np.allclose(e.encode(TEXTS, max_batch_tokens=40), full, atol=1e-5)


def test_torch_and_onnxruntime_backends_agree(tiny_artifact):
    a = Embedder.from_artifact(tiny_artifact, backend="torch").encode(TEXTS, prompt="STSBenchmark")
    b = Embedder.from_artifact(tiny_artifact, backend="onnxruntime").encode(TEXTS, prompt="STSBenchmark")
    assert (a * b).sum(1).min() >= 0.99999


def test_prompts_change_the_embedding_as_templates_say(tiny_artifact):
    e = Embedder.from_artifact(tiny_artifact)
    q = e.encode_queries(["how do vaccines work?"], task="TRECCOVID")
    manual = e.encode(["Instruct: Given a query on COVID-19, retrieve documents that answer the query\nQuery: how do vaccines work?"])
    assert np.allclose(q, manual, atol=1e-6)
    d = e.encode_documents(["how do vaccines work?"], task="TRECCOVID")
    assert np.allclose(d, e.encode(["how do vaccines work?"]), atol=1e-6)
    assert not np.allclose(q, d, atol=1e-3)


def test_bad_inputs(tiny_artifact):
    e = Embedder.from_artifact(tiny_artifact)
    with pytest.raises(UserInputError):
        e.encode([])
    with pytest.raises(UserInputError):
        e.encode([""])
    with pytest.raises(UserInputError):
        e.encode(["ok"], prompt="NoSuchTask")
    with pytest.raises(UserInputError):
        Embedder.from_artifact(tiny_artifact, backend="jax")


def test_huge_text_is_truncated_not_crashed(tiny_artifact):
    e = Embedder.from_artifact(tiny_artifact)
    v = e.encode(["word " * 200_000])
    assert v.shape == (1, 64) and np.isfinite(v).all()


def test_requested_provider_that_is_not_active_is_an_error(tiny_artifact):
    available = ort.get_available_providers()
    assert "CUDAExecutionProvider" not in available  # CPU package in this environment
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        check_providers(["CUDAExecutionProvider"], available, ["CPUExecutionProvider"])
    # a GPU build that silently fell back to CPU
    with pytest.raises(BackendUnavailableError, match="fell back"):
        check_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    check_providers(["CUDAExecutionProvider"], available, ["CPUExecutionProvider"], allow_fallback=True)
    path = Manifest.load(tiny_artifact).artifact_path("export:fp32", "onnx")
    with pytest.raises(BackendUnavailableError):
        OrtRunner(path, providers=["CUDAExecutionProvider"]).activate()
