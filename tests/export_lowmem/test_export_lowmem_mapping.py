"""Initializer -> safetensors mapping of the low-memory path: exact or a typed error, never garbage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sfr_export.errors import ExportValidationError, ModelLoadError
from sfr_export.artifact import Precision
from sfr_export.stages.lowmem_export import (SafetensorsIndex, _recompute_buffer, _source_key, build_meta_wrapper,
                                             check_checkpoint, map_initializers)


def _copy_model(src, dst, *, tensors=None, config_changes=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else load_file(str(src / "model.safetensors")), str(dst / "model.safetensors"))
    return dst


def test_every_initializer_maps_exactly(meta_trace):
    model, wrapper, config, index = meta_trace
    plans, buffers = map_initializers(model, wrapper, config, index)
    by_name = {p.onnx_name: p for p in plans}
    assert set(by_name) == {f"backbone.{k}" for k in index.tensors} | {"backbone.rotary_emb.inv_freq"}
    for p in plans:
        if p.source.startswith("buffer:"):
            assert p.onnx_name in buffers
        else:
            assert p.source == p.onnx_name.removeprefix("backbone.")
            assert index.tensors[p.source].shape == p.shape and p.dtype == "float32"
    assert not any(p.transpose for p in plans), "mapping alone must not change the graph"


def test_initializer_made_by_the_exporter_is_refused(meta_trace):
    """A weight the exporter folded into a new constant cannot be found in safetensors: typed error, not garbage."""
    model, wrapper, config, index = meta_trace
    graph = model.graph
    some = graph.initializers["backbone.layers.0.self_attn.q_proj.weight"]
    import onnx_ir as ir

    folded = ir.Value(name="val_999", shape=ir.Shape([64, 64]),
                      const_value=type(some.const_value)(torch.empty(64, 64, device="meta"), name="val_999"))
    graph.register_initializer(folded)
    try:
        with pytest.raises(ExportValidationError, match="val_999.*not a parameter"):
            map_initializers(model, wrapper, config, index)
    finally:
        graph.initializers.pop("val_999")
    map_initializers(model, wrapper, config, index)  # the fixture is intact again


def test_transposed_initializer_is_refused(meta_trace):
    model, wrapper, config, index = meta_trace
    name = "backbone.layers.1.mlp.down_proj.weight"  # [64, 128] in the checkpoint
    value = model.graph.initializers[name]
    original = value.const_value
    value.const_value = type(original)(torch.empty(128, 64, device="meta"), name=name)
    try:
        with pytest.raises(ExportValidationError, match="down_proj.*transposed or reshaped"):
            map_initializers(model, wrapper, config, index)
    finally:
        value.const_value = original


def test_recomputed_inv_freq_is_the_models(meta_trace, tiny):
    from sfr_export.models import load_backbone

    _, wrapper, config, _ = meta_trace
    got = _recompute_buffer(wrapper.backbone, "rotary_emb.inv_freq", config)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, load_backbone(tiny.local_dir).rotary_emb.inv_freq, rtol=0, atol=0)


def test_missing_tensor_gives_a_clear_error(tmp_path, tiny):
    """The error names the tensor and comes before any tracing; nothing is written."""
    from sfr_export.stages.export import ExportConfig
    from sfr_export.stages.lowmem_export import export_low_memory

    tensors = load_file(str(tiny.local_dir / "model.safetensors"))
    del tensors["layers.1.mlp.up_proj.weight"]
    d = _copy_model(tiny.local_dir, tmp_path / "broken", tensors=tensors)
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelLoadError, match=r"missing from model\.safetensors: layers\.1\.mlp\.up_proj\.weight"):
        export_low_memory(d, tiny.spec, ExportConfig(low_memory="on", validate=False), tmp_path / "out" / "model.onnx")
    assert not list((tmp_path / "out").iterdir())


def test_truncated_safetensors_is_refused(tmp_path, tiny):
    d = _copy_model(tiny.local_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        SafetensorsIndex(d)


def test_causal_lm_keys_and_tied_embeddings(tmp_path, tiny):
    """`model.`-prefixed checkpoints map; with tied embeddings a checkpoint holding only lm_head.weight maps too."""
    src = load_file(str(tiny.local_dir / "model.safetensors"))
    tensors = {f"model.{k}": v for k, v in src.items() if k != "embed_tokens.weight"}
    tensors["lm_head.weight"] = src["embed_tokens.weight"]
    d = _copy_model(tiny.local_dir, tmp_path / "causal", tensors=tensors, config_changes={"tie_word_embeddings": True})
    wrapper, config = build_meta_wrapper(d, tiny.spec, Precision.FP32)
    index = SafetensorsIndex(d)
    check_checkpoint(wrapper.backbone, config, index)
    assert _source_key("embed_tokens.weight", index, wrapper.backbone, config) == "lm_head.weight"
    assert _source_key("layers.0.mlp.up_proj.weight", index, wrapper.backbone, config) == "model.layers.0.mlp.up_proj.weight"
    # without tying, the embedding is missing
    d2 = _copy_model(tiny.local_dir, tmp_path / "untied", tensors=tensors)
    wrapper2, config2 = build_meta_wrapper(d2, tiny.spec, Precision.FP32)
    with pytest.raises(ModelLoadError, match="embed_tokens.weight"):
        check_checkpoint(wrapper2.backbone, config2, SafetensorsIndex(d2))
