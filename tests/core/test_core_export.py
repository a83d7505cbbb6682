"""ONNX export on the tiny Mistral (fp32/fp16) and the real MiniLM and SmolLM2, validated against PyTorch."""

import numpy as np
import onnx
import pytest
import torch

from sfr_export.errors import ExportValidationError
from sfr_export.artifact import Manifest
from sfr_export.models import load_tokenizer, resolve_model
from sfr_export.runtime import Embedder
from sfr_export.runtime.torch_runner import TorchRunner
from sfr_export.stages.export import OnnxIOSpec, validate_onnx, validation_texts


def test_graph_contract_and_dynamic_axes(tiny_artifact):
    m = Manifest.load(tiny_artifact)
    path = m.artifact_path("export:fp32", "onnx")
    OnnxIOSpec().check(path, dim=64)
    g = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert g.output[0].name == "sentence_embedding"
    # pooling and L2 normalisation are inside the graph
    ops = {n.op_type for n in g.node}
    assert "ArgMax" in ops and ("ReduceL2" in ops or "Sqrt" in ops or "LpNormalization" in ops)


def test_validation_cosines_recorded(tiny_artifact):
    m = Manifest.load(tiny_artifact)
    v32 = m.stage("export:fp32").figures["validation"]
    v16 = m.stage("export:fp16").figures["validation"]
    assert v32["min_cosine"] >= 0.99999 and v16["min_cosine"] >= 0.9995
    # the validation batch is mixed-length and goes past the tiny model's sliding window (32)
    lengths = v32["right_padding"]["lengths"]
    assert len(set(lengths)) > 2 and max(lengths) > 32


def test_onnx_matches_torch_on_both_padding_sides_past_the_window(tiny_artifact):
    texts = ["short", "A man is playing a guitar on the street. " * 12, "medium length text about vaccines and cells"]
    ref = Embedder.from_artifact(tiny_artifact, backend="torch")
    enc = ref.tokenize(texts)
    assert max(len(i) for i in enc.ids) > 32
    for side in ("right", "left"):
        ref.tokenizer.spec = ref.tokenizer.spec.replace(padding_side=side)
        ids, mask = ref.tokenizer.pad(enc.ids)
        for variant, floor in (("fp32", 0.99999), ("fp16", 0.9995)):
            cand = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant=variant)
            a, b = ref.runner.infer(ids, mask), cand.runner.infer(ids, mask)
            cos = (a * b).sum(1)
            assert cos.min() >= floor, (side, variant, cos)
            assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)


def test_validation_failure_names_the_worst_input(tiny_artifact):
    m = Manifest.load(tiny_artifact)
    r = resolve_model("demo:tiny-mistral", compute_fingerprint=False)
    runner = TorchRunner(r.local_dir, r.spec)
    runner.activate()
    with torch.no_grad():  # a model that differs from the exported one
        runner.model.layers[1].mlp.down_proj.weight.mul_(-3.0)
    with pytest.raises(ExportValidationError) as info:
        validate_onnx(m.artifact_path("export:fp32", "onnx"), runner, load_tokenizer(r.local_dir), r.spec,
                      threshold=0.99999, sliding_window=32)
    assert info.value.worst_text in validation_texts(r.spec, 32)
    assert "min cosine" in str(info.value)


@pytest.mark.slow
def test_real_minilm_export(minilm_artifact):
    m = Manifest.load(minilm_artifact)
    assert m.stage("export:fp32").figures["validation"]["min_cosine"] >= 0.99999
    onnx_e = Embedder.from_artifact(minilm_artifact, backend="onnxruntime")
    ref = Embedder.from_artifact(minilm_artifact, backend="torch")
    texts = ["A man is playing a guitar.", "A person plays an instrument.", "The stock market fell sharply today."]
    a, b = ref.encode(texts), onnx_e.encode(texts)
    assert (a * b).sum(1).min() >= 0.99999
    sims = b @ b.T
    assert sims[0, 1] > sims[0, 2]  # real weights: paraphrase closer than an unrelated sentence


@pytest.mark.slow
def test_real_smollm2_export(smollm2_artifact):
    m = Manifest.load(smollm2_artifact)
    assert m.stage("export:fp32").figures["validation"]["min_cosine"] >= 0.99999
    onnx_e = Embedder.from_artifact(smollm2_artifact, backend="onnxruntime")
    ref = Embedder.from_artifact(smollm2_artifact, backend="torch")
    texts = ["Retrieve this passage about the ACE2 receptor.", "word " * 700]
    assert (ref.encode(texts) * onnx_e.encode(texts)).sum(1).min() >= 0.99999
    assert onnx_e.tokenize(texts).ids[1][-1] == onnx_e.tokenizer.eos_id
