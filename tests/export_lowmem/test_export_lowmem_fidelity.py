"""Low-memory exports of demo:tiny-mistral agree with PyTorch and carry the checkpoint's exact weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from safetensors import safe_open

from sfr_export.stages.export import OnnxIOSpec
from sfr_export.vectors import row_cosine

TEXTS = [
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: how do vaccines work?",
    "Ein Mann spielt Gitarre.",
    "short",
    # past demo:tiny-mistral's sliding window (32 tokens)
    "Transformers encode text into vectors; the last token after EOS summarises the sequence. " * 6,
]


def _external(init: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in init.external_data}


def _min_cosine_vs_torch(onnx_path, tiny) -> dict[str, float]:
    from sfr_export.models import load_tokenizer
    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.runtime.torch_runner import TorchRunner
    from sfr_export.tokenization import TextTokenizer

    tok = load_tokenizer(tiny.local_dir)
    out = {}
    with OrtRunner(onnx_path) as ort, TorchRunner(tiny.local_dir, tiny.spec, dtype="float32") as ref:
        for side in ("right", "left"):
            tt = TextTokenizer(tok, tiny.spec.replace(padding_side=side))
            ids, mask = tt.pad(tt.encode(TEXTS).ids)
            assert mask.sum(axis=1).min() < mask.shape[1], "the batch must contain padding"
            out[side] = float(row_cosine(ref.infer(ids, mask), ort.infer(ids, mask)).min())
    return out


@pytest.mark.parametrize("precision,threshold", [("fp32", 0.99999), ("fp16", 0.9995)])
def test_lowmem_export_agrees_with_pytorch(request, tiny, precision, threshold):
    root, rec = request.getfixturevalue(f"lowmem_{precision}")
    f = rec.figures
    assert f["low_memory"] is True and f["external_data"] is True
    # the worker's own validation (mixed lengths, both padding sides, past the sliding window)
    assert f["validation"]["right_padding"]["min_cosine"] >= threshold
    assert f["validation"]["left_padding"]["min_cosine"] >= threshold
    assert f["buffers_recomputed"] == ["backbone.rotary_emb.inv_freq"]
    assert f["transposes_folded"] == 14  # 7 projections x 2 layers
    onnx_path = root / "onnx" / precision / "model.onnx"
    OnnxIOSpec().check(onnx_path, dim=64)
    # an independent check on other texts
    cos = _min_cosine_vs_torch(onnx_path, tiny)
    assert min(cos.values()) >= threshold, cos


def test_fp16_dtype_policy(lowmem_fp16):
    root, _ = lowmem_fp16
    m = onnx.load(str(root / "onnx" / "fp16" / "model.onnx"), load_external_data=False)
    dtypes = {i.name: i.data_type for i in m.graph.initializer if i.name.startswith("backbone.")}
    norms = [n for n in dtypes if n.endswith("norm.weight")]
    mats = [n for n in dtypes if n.endswith("proj.weight") or n.endswith("embed_tokens.weight")]
    assert len(norms) == 5 and len(mats) == 15
    assert all(dtypes[n] == onnx.TensorProto.FLOAT for n in norms), "norm layers run in fp32"
    assert all(dtypes[n] == onnx.TensorProto.FLOAT16 for n in mats)
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_streamed_bytes_are_the_checkpoint_tensors(lowmem_fp32, tiny):
    """Every external initializer holds exactly the safetensors tensor (transposed where the MatMul wants it)."""
    from sfr_export.models import load_backbone

    root, rec = lowmem_fp32
    d = root / "onnx" / "fp32"
    m = onnx.load(str(d / "model.onnx"), load_external_data=False)
    data = np.fromfile(d / "model.onnx.data", dtype=np.uint8)
    inv_freq = load_backbone(tiny.local_dir).rotary_emb.inv_freq.numpy()
    externals = [i for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(externals) == rec.figures["weights_streamed"] == 21
    transposed = 0
    with safe_open(str(tiny.local_dir / "model.safetensors"), framework="np") as st:
        assert {i.name.removeprefix("backbone.") for i in externals} == set(st.keys()) | {"rotary_emb.inv_freq"}
        for init in externals:
            ext = _external(init)
            assert ext["location"] == "model.onnx.data"
            off, length = int(ext["offset"]), int(ext["length"])
            assert off % (4096 if length >= 1 << 20 else 64) == 0
            got = data[off:off + length].view(np.float32).reshape(tuple(init.dims))
            key = init.name.removeprefix("backbone.")
            want = inv_freq if key == "rotary_emb.inv_freq" else st.get_tensor(key)
            if key.endswith("proj.weight"):  # the MatMul weights are stored [in, out]
                want = want.T
                transposed += 1
            np.testing.assert_array_equal(got, want, err_msg=init.name)
    assert transposed == 14
    # the MatMuls read the weights directly: no Transpose is fed by an initializer
    inits = {i.name for i in m.graph.initializer}
    assert not [n for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
