"""Low-memory ONNX export for 7B-class models: graph on the meta device, weights streamed from safetensors.

The normal export path loads the whole model, traces it and lets the exporter serialise every weight, which needs a
few times the weight bytes of RAM. Here instead:

1. the backbone is built from ``config.json`` on the ``meta`` device (no storage), wrapped with the same
   :func:`~sfr_export.stages.export_graph.make_wrapper` (pooling from :mod:`sfr_export.pooling`, fused attention) and, for
   fp16, given the same dtype policy (:func:`~sfr_export.stages.export_graph.norms_to_fp32`);
2. :func:`~sfr_export.stages.export_graph.export_program` (the one ``torch.onnx.export`` call, here with
   ``optimize=False``) traces it with meta example inputs, so every initializer of the
   resulting ONNX IR model still holds a meta tensor (shape and dtype, no data); the exporter's onnxscript optimizer
   then runs with those initializers detached (it would otherwise try to constant-fold meta tensors);
3. each initializer is mapped to a safetensors key (``backbone.`` prefix, ``model.``/base-prefix checkpoints, tied
   embeddings) or, for non-persistent buffers such as ``rotary_emb.inv_freq``, to a value recomputed on CPU from the
   config; anything the exporter created or reshaped that cannot be mapped exactly raises
   :class:`~sfr_export.errors.ExportValidationError`;
4. ``Transpose(perm=[1, 0])`` nodes fed only by a weight are folded (the weight is written transposed), as the
   exporter's optimizer does on the normal path, so ``MatMul`` reads its weight directly;
5. the weights are streamed one tensor at a time into ``model.onnx.data`` at aligned offsets and the initializers
   become ``TensorProto``\\ s with ``data_location = EXTERNAL``; the graph (without data) is written last.

Weights are read with positioned reads at the offsets of the safetensors header instead of through a memory map:
pages touched through a map stay in the process's RSS until the map closes, which would make the peak the whole
checkpoint; ``safetensors.safe_open`` still indexes the files (keys, shapes, dtypes) and validates the headers.
Peak memory is thus the traced graph plus one tensor (and its converted copy).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ExportValidationError, ModelLoadError
from ..spec import ModelSpec
from ..artifact import Precision
from ..worker import peak_rss_mb
from .common import progress

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "backbone."
ALIGNMENT = 4096  # page-aligned offsets: the .data file can be memory-mapped tensor by tensor
SMALL_ALIGNMENT = 64  # tensors below 1 MiB
_IR_DTYPES = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float64": "DOUBLE", "int64": "INT64",
              "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# ------------------------------------------------------------------------------------------------------------------
# safetensors index: key -> (file, byte range, dtype, shape); one tensor read at a time
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    key: str
    file: Path
    start: int  # absolute byte offset in the file
    end: int
    dtype: str  # torch dtype name
    shape: tuple[int, ...]


class SafetensorsIndex:
    """Every tensor of a model dir's ``*.safetensors`` shards, read one at a time with positioned reads."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import SafetensorError, safe_open

        from ..models.loading import weight_files

        self.tensors: dict[str, StoredTensor] = {}
        for f in weight_files(Path(model_dir)):
            try:
                with safe_open(str(f), framework="pt") as st:  # validates the header and gives the key set
                    keys = set(st.keys())
                with open(f, "rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error, SafetensorError) as exc:
                raise ModelLoadError(f"could not read safetensors file {f}: {exc}") from exc
            header.pop("__metadata__", None)
            if set(header) != keys:
                raise ModelLoadError(f"safetensors header of {f} disagrees with safe_open's key list")
            size = f.stat().st_size
            for key, meta in header.items():
                if key in self.tensors:
                    raise ModelLoadError(f"tensor {key!r} appears in two shards ({self.tensors[key].file.name}, {f.name})")
                begin, end = (8 + n + int(o) for o in meta["data_offsets"])
                if meta["dtype"] not in _ST_DTYPES or end > size:
                    raise ModelLoadError(f"tensor {key!r} in {f.name} has dtype {meta['dtype']} / range past the end of the file")
                self.tensors[key] = StoredTensor(key, f, begin, end, _ST_DTYPES[meta["dtype"]], tuple(meta["shape"]))

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, key: str) -> Any:
        """The tensor ``key`` as a CPU torch tensor in its stored dtype (one ``readinto`` into a fresh buffer)."""
        import torch

        t = self.tensors[key]
        buf = torch.empty(t.end - t.start, dtype=torch.uint8)
        with open(t.file, "rb", buffering=0) as fh:
            fh.seek(t.start)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise ModelLoadError(f"{t.file.name} ends inside tensor {key!r}: the file is truncated")
                got += n
        return buf.view(getattr(torch, t.dtype)).reshape(t.shape)


# ------------------------------------------------------------------------------------------------------------------
# Meta-device graph
# ------------------------------------------------------------------------------------------------------------------
def build_meta_wrapper(model_dir: Path, spec: ModelSpec, precision: Precision) -> tuple[Any, Any]:
    """The export wrapper around a weightless backbone, with the normal path's dtype policy. Returns (wrapper, config)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from .export_graph import make_wrapper, norms_to_fp32

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read {model_dir}/config.json: {str(exc).splitlines()[0][:200]}") from exc
    with torch.device("meta"):
        backbone = AutoModel.from_config(config, attn_implementation="sdpa").float()
    backbone.eval()
    if precision is Precision.FP16:
        backbone = backbone.half()
        norms_to_fp32(backbone)
    return make_wrapper(backbone, spec), config


def trace_graph(wrapper: Any, opset: int) -> Any:
    """The shared export call on meta inputs; returns the ONNX IR model whose weights are still meta."""
    from .export_graph import OnnxIOSpec, export_program

    # optimize=False: the onnxscript optimizer would try to constant-fold meta tensors
    return export_program(wrapper, OnnxIOSpec(), opset=opset, optimize=False, device="meta").model


def optimize_without_weights(model: Any) -> int:
    """Run the exporter's own optimizer (onnxscript) with the weights detached, then reattach them.

    The optimizer folds the shape arithmetic, Cast/CastLike/Identity chains and Constant nodes exactly as on the normal
    path; initializers without a value cannot be folded, so no weight is touched (weight transposes are folded later,
    while streaming). Returns the number of weights detached.
    """
    import onnxscript.optimizer

    graph = model.graph
    detached = {name: v.const_value for name, v in graph.initializers.items() if _meta_tensor(v) is not None}
    for name in detached:
        graph.initializers[name].const_value = None
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)  # it warns once per weight that a value-less initializer cannot be deduplicated
    try:
        onnxscript.optimizer.optimize_ir(model)
    finally:
        dedup_log.setLevel(level)
    for name, value in graph.initializers.items():
        if value.const_value is None:
            if name not in detached:
                raise ExportValidationError(f"the ONNX optimizer produced initializer {name!r} without a value")
            value.const_value = detached[name]
    return len(detached)


# ------------------------------------------------------------------------------------------------------------------
# Initializer plan: where each weight comes from and how it is written
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class WeightPlan:
    onnx_name: str  # name of the initializer in the final graph
    source: str  # safetensors key, or "buffer:<module path>.<name>" for a recomputed non-persistent buffer
    dtype: str  # torch dtype name written to the .data file
    shape: tuple[int, ...]  # shape in the graph (transposed when ``transpose``)
    transpose: bool = False


def _meta_tensor(value: Any) -> Any | None:
    """The torch meta tensor behind an initializer, or None when it holds real data."""
    raw = getattr(value.const_value, "raw", None)
    if raw is not None and getattr(raw, "is_meta", False):
        return raw
    return None


def _candidate_keys(name: str, base_prefix: str) -> list[str]:
    if not name.startswith(WRAPPER_PREFIX):
        return []
    rel = name[len(WRAPPER_PREFIX):]
    keys = [rel, f"model.{rel}"]
    if base_prefix and base_prefix != "model":
        keys.append(f"{base_prefix}.{rel}")
    return keys


def _tied_alias(rel: str, backbone: Any, config: Any) -> list[str]:
    """For tied embeddings: the output embedding's key when a checkpoint stores only that one."""
    if not getattr(config, "tie_word_embeddings", False):
        return []
    emb = backbone.get_input_embeddings()
    emb_name = next((n for n, m in backbone.named_modules() if m is emb), None)
    if emb_name is None or rel != f"{emb_name}.weight":
        return []
    return ["lm_head.weight"]


def _recompute_buffer(backbone: Any, rel: str, config: Any) -> Any:
    """A non-persistent buffer (e.g. ``rotary_emb.inv_freq``) computed on CPU by re-creating its module from the config."""
    import torch

    mod_path, _, buf_name = rel.rpartition(".")
    try:
        module = backbone.get_submodule(mod_path) if mod_path else backbone
    except AttributeError:
        raise ExportValidationError(f"graph initializer backbone.{rel} names no module of the model") from None
    if buf_name not in getattr(module, "_non_persistent_buffers_set", set()):
        raise ExportValidationError(f"weight backbone.{rel} is missing from the safetensors files")
    params = [p for p in inspect.signature(type(module).__init__).parameters if p != "self"]
    if params[:1] != ["config"] or any(inspect.signature(type(module).__init__).parameters[p].default is inspect.Parameter.empty
                                        for p in params[1:]):
        raise ExportValidationError(f"cannot recompute the non-persistent buffer backbone.{rel}: "
                                    f"{type(module).__name__}(...) is not constructible from the model config")
    with torch.device("cpu"):
        fresh = type(module)(getattr(module, "config", config))
    value = getattr(fresh, buf_name)
    if tuple(value.shape) != tuple(getattr(module, buf_name).shape):
        raise ExportValidationError(f"recomputed buffer backbone.{rel} has shape {tuple(value.shape)}, "
                                    f"the graph expects {tuple(getattr(module, buf_name).shape)}")
    return value.detach().to("cpu")


def _source_key(rel: str, index: SafetensorsIndex, backbone: Any, config: Any) -> str | None:
    base_prefix = getattr(backbone, "base_model_prefix", "") or ""
    cands = _candidate_keys(WRAPPER_PREFIX + rel, base_prefix) + _tied_alias(rel, backbone, config)
    return next((k for k in cands if k in index), None)


def check_checkpoint(backbone: Any, config: Any, index: SafetensorsIndex) -> None:
    """Fail fast, before tracing, when a persistent weight of the model is not in the safetensors files."""
    missing = [k for k in backbone.state_dict() if _source_key(k, index, backbone, config) is None]
    if missing:
        files = sorted({t.file.name for t in index.tensors.values()})
        raise ModelLoadError(f"{len(missing)} weight(s) of the model are missing from {', '.join(files)}: "
                             f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")


def map_initializers(model: Any, wrapper: Any, config: Any, index: SafetensorsIndex) -> tuple[list[WeightPlan], dict[str, Any]]:
    """Map every meta initializer of ``model`` to a safetensors key or a recomputed buffer (the graph is not changed).

    Raises ExportValidationError for an initializer that cannot be mapped exactly: a name the exporter made up (a
    folded or derived weight) or a shape that differs from the stored tensor (transposed or reshaped by the exporter).
    Returns the plans and the recomputed buffers keyed by initializer name.
    """
    backbone = wrapper.backbone
    plans: list[WeightPlan] = []
    buffers: dict[str, Any] = {}
    for name, value in list(model.graph.initializers.items()):
        meta = _meta_tensor(value)
        if meta is None:
            continue  # a real constant the exporter computed (kept inline)
        shape = tuple(int(d) for d in meta.shape)
        dtype = str(meta.dtype).removeprefix("torch.")
        if dtype not in _IR_DTYPES:
            raise ExportValidationError(f"graph initializer {name!r} has dtype {dtype}, which the low-memory path does not write")
        if not name.startswith(WRAPPER_PREFIX):
            raise ExportValidationError(
                f"graph initializer {name!r} {list(shape)} is not a parameter of the wrapped model (the exporter created "
                "or folded it), so it cannot be attached from safetensors; export with low_memory='off'")
        rel = name[len(WRAPPER_PREFIX):]
        key = _source_key(rel, index, backbone, config)
        if key is not None:
            stored = index.tensors[key]
            if stored.shape != shape:
                raise ExportValidationError(
                    f"graph initializer {name!r} has shape {list(shape)} but safetensors {key!r} has "
                    f"{list(stored.shape)} (transposed or reshaped by the exporter); refusing to attach it")
            source = key
        else:
            buffers[name] = _recompute_buffer(backbone, rel, config)
            source = f"buffer:{rel}"
        plans.append(WeightPlan(onnx_name=name, source=source, dtype=dtype, shape=shape))
    return plans, buffers


def fold_weight_transposes(model: Any, plans: list[WeightPlan]) -> int:
    """Fold ``Transpose(perm=[1, 0])`` nodes whose only input is a planned 2-D weight used nowhere else.

    The weight is then written transposed and the ``MatMul`` reads it directly, as after the exporter's optimizer on
    the normal path. Returns the number of folded transposes.
    """
    import onnx_ir as ir

    graph = model.graph
    folded = 0
    for plan in plans:
        value = graph.initializers[plan.onnx_name]
        uses = list(value.uses())
        if len(plan.shape) != 2 or len(uses) != 1:
            continue
        node = uses[0][0]
        if (node.op_type != "Transpose" or node.domain not in ("", "ai.onnx")
                or tuple(node.attributes.get_ints("perm", ())) != (1, 0) or node.outputs[0].is_graph_output()):
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
        graph.remove(node, safe=True)
        plan.transpose = True
        plan.shape = (plan.shape[1], plan.shape[0])
        value.shape = ir.Shape(plan.shape)
        folded += 1
    return folded


# ------------------------------------------------------------------------------------------------------------------
# Streaming the weights into the external-data file
# ------------------------------------------------------------------------------------------------------------------
def _load(plan: WeightPlan, index: SafetensorsIndex, buffers: dict[str, Any]) -> Any:
    import torch

    t = buffers.pop(plan.onnx_name) if plan.source.startswith("buffer:") else index.read(plan.source)
    t = t.to(getattr(torch, plan.dtype))
    if plan.transpose:
        t = t.t()
    return t.contiguous()


def stream_weights(model: Any, plans: list[WeightPlan], index: SafetensorsIndex, buffers: dict[str, Any],
                   data_path: Path) -> int:
    """Write each planned tensor at an aligned offset of ``data_path`` and point its initializer there."""
    import onnx_ir as ir
    import torch

    graph = model.graph
    offset = 0
    with open(data_path, "wb") as fh:
        for i, plan in enumerate(plans):
            t = _load(plan, index, buffers)
            if tuple(t.shape) != plan.shape:  # guards the write itself
                raise ExportValidationError(f"{plan.onnx_name}: prepared tensor has shape {tuple(t.shape)}, "
                                            f"expected {plan.shape}")
            raw = t.view(-1).view(torch.uint8).numpy()
            align = ALIGNMENT if raw.nbytes >= 1 << 20 else SMALL_ALIGNMENT
            pad = (-offset) % align
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(memoryview(raw))
            value = graph.initializers[plan.onnx_name]
            dtype = getattr(ir.DataType, _IR_DTYPES[plan.dtype])
            value.const_value = ir.ExternalTensor(data_path.name, offset, raw.nbytes, dtype, shape=ir.Shape(plan.shape),
                                                  name=plan.onnx_name, base_dir=data_path.parent)
            offset += raw.nbytes
            del t, raw
            if (i + 1) % 32 == 0 or i + 1 == len(plans):
                progress(f"attached {i + 1}/{len(plans)} weights ({offset / 2**30:.2f} GiB)")
    return offset


def export_low_memory(model_dir: Path, spec: ModelSpec, cfg: Any, onnx_path: Path) -> dict[str, Any]:
    """Write ``onnx_path`` + ``onnx_path.data`` without ever holding the model's weights; returns figures."""
    import onnx_ir as ir

    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    index = SafetensorsIndex(model_dir)
    wrapper, config = build_meta_wrapper(model_dir, spec, cfg.precision)
    check_checkpoint(wrapper.backbone, config, index)
    progress("tracing on the meta device with torch.onnx.export(dynamo=True)")
    model = trace_graph(wrapper, cfg.opset)
    progress("optimizing the graph (weights detached)")
    optimize_without_weights(model)
    graph_peak = peak_rss_mb()
    plans, buffers = map_initializers(model, wrapper, config, index)
    folded = fold_weight_transposes(model, plans)
    del wrapper
    data_path = onnx_path.with_name(onnx_path.name + ".data")
    progress(f"streaming {len(plans)} weights from safetensors into {data_path.name}")
    data_bytes = stream_weights(model, plans, index, buffers, data_path)
    proto = ir.serde.serialize_model(model)
    tmp = onnx_path.with_name(onnx_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(proto.SerializeToString())
    os.replace(tmp, onnx_path)
    return {"external_data": True, "weights_streamed": len(plans),
            "transposes_folded": folded,
            "buffers_recomputed": [p.onnx_name for p in plans if p.source.startswith("buffer:")],
            "external_data_bytes": data_bytes, "graph_peak_rss_mb": graph_peak, "export_peak_rss_mb": peak_rss_mb()}
