"""The ONNX Runtime CPU form of a causal graph: each ONNX ``Attention`` node becomes ``com.microsoft.GroupQueryAttention``.

ONNX Runtime's CPU kernel for the standard ``Attention`` op (opset 23/24) materialises a ``B x H x L x L`` score
buffer; its contrib ``GroupQueryAttention`` runs the prompt pass tile by tile, skips the padding of right-padded rows
(``seqlens_k``) and keeps a sliding window (``local_window_size``), so its memory grows linearly with L. The rewrite
is exact for the graphs :mod:`sfr_export.stages.export_graph` writes in the causal form (right padding, no padding mask):

- ``Q/K/V [B, H, L, D]`` -> ``Transpose(0, 2, 1, 3)`` -> ``Reshape [B, L, H*D]`` (the layout GQA reads);
- ``seqlens_k = sum(attention_mask, 1) - 1`` (int32) and ``total_sequence_length = L``, computed once per graph;
- the output ``[B, L, Hq*D]`` goes back to ``[B, Hq, L, D]`` for the rest of the graph;
- a band mask input (sliding window) is dropped for ``local_window_size = window`` (checked against PyTorch past
  the window by the tests).

The standard form stays the portable artifact (TensorRT, CUDA); this one is written next to it as ``model.cpu.onnx``,
sharing its external-data file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ExportValidationError
from .export_graph import META_ATTENTION, META_WINDOW, AttentionForm

CPU_FORM_NAME = "model.cpu.onnx"
_SEQLENS = "sfr_gqa_seqlens_k"
_TOTAL = "sfr_gqa_total_len"


def _const(name: str, values: list[int]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name + "_v", TensorProto.INT64, [len(values)], values))


def _shared_inputs(mask: str, ids: str) -> list[Any]:
    """seqlens_k [B] int32 and total_sequence_length (scalar int32) from the graph inputs."""
    from onnx import TensorProto, helper

    return [
        _const("sfr_gqa_axis1", [1]),
        _const("sfr_gqa_one", [1]),
        helper.make_node("ReduceSum", [mask, "sfr_gqa_axis1"], ["sfr_gqa_len"], keepdims=0, name="sfr_gqa_len"),
        helper.make_node("Sub", ["sfr_gqa_len", "sfr_gqa_one"], ["sfr_gqa_len_m1"], name="sfr_gqa_len_m1"),
        helper.make_node("Cast", ["sfr_gqa_len_m1"], [_SEQLENS], to=TensorProto.INT32, name=_SEQLENS),
        helper.make_node("Shape", [ids], ["sfr_gqa_L1"], start=1, end=2, name="sfr_gqa_L1"),
        helper.make_node("Squeeze", ["sfr_gqa_L1"], ["sfr_gqa_L"], name="sfr_gqa_L"),
        helper.make_node("Cast", ["sfr_gqa_L"], [_TOTAL], to=TensorProto.INT32, name=_TOTAL),
        _const("sfr_gqa_bs_flat", [0, 0, -1]),
    ]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replace(node: Any, i: int, *, heads: int, kv_heads: int, head_dim: int, window: int | None) -> list[Any]:
    """The nodes that replace Attention node number ``i``."""
    from onnx import helper

    q, k, v = node.input[:3]
    mask = node.input[3] if len(node.input) > 3 else ""
    if any(node.input[4:]) or any(node.output[1:]):
        raise ExportValidationError(f"Attention node {node.name} has a KV cache or extra outputs; cannot rewrite it")
    if mask and window is None:
        raise ExportValidationError(f"Attention node {node.name} takes a mask but the graph records no sliding "
                                    "window: it is not a causal-only graph")
    if not mask and not _attr(node, "is_causal", 0):
        raise ExportValidationError(f"Attention node {node.name} is neither causal nor windowed")
    p = f"sfr_gqa{i}"
    out: list[Any] = []
    flat = []
    for name, tag in ((q, "q"), (k, "k"), (v, "v")):
        out.append(helper.make_node("Transpose", [name], [f"{p}_{tag}t"], perm=[0, 2, 1, 3], name=f"{p}_{tag}t"))
        out.append(helper.make_node("Reshape", [f"{p}_{tag}t", "sfr_gqa_bs_flat"], [f"{p}_{tag}3"], name=f"{p}_{tag}3"))
        flat.append(f"{p}_{tag}3")
    attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads,
                             "local_window_size": window if window else -1}
    scale = _attr(node, "scale", None)
    if scale is not None:
        attrs["scale"] = float(scale)
    out.append(helper.make_node("GroupQueryAttention", [*flat, "", "", _SEQLENS, _TOTAL], [f"{p}_o3"],
                                domain="com.microsoft", name=f"{p}_gqa", **attrs))
    out.append(_const(f"{p}_shape4", [0, 0, heads, head_dim]))
    out.append(helper.make_node("Reshape", [f"{p}_o3", f"{p}_shape4"], [f"{p}_o4"], name=f"{p}_o4"))
    out.append(helper.make_node("Transpose", [f"{p}_o4"], [node.output[0]], perm=[0, 2, 1, 3], name=f"{p}_out"))
    return out


def rewrite_to_gqa(model: Any, *, heads: int, kv_heads: int, head_dim: int) -> int:
    """Rewrite every ``Attention`` node of a causal-form ONNX ModelProto in place; returns how many."""
    from onnx import helper

    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(META_ATTENTION) != AttentionForm.CAUSAL.value:
        raise ExportValidationError(f"only causal graphs have a GroupQueryAttention form (this one: "
                                    f"{meta.get(META_ATTENTION, 'unrecorded')})")
    window = int(meta.get(META_WINDOW, "0")) or None
    g = model.graph
    inputs = [i.name for i in g.input]
    nodes: list[Any] = _shared_inputs(inputs[1], inputs[0])
    count = 0
    for node in g.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            nodes.extend(_replace(node, count, heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=window))
            count += 1
        else:
            nodes.append(node)
    if count == 0:
        raise ExportValidationError("the graph has no ONNX Attention node to rewrite (exported below opset 23?)")
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def write_cpu_form(src: Path, *, heads: int, kv_heads: int, head_dim: int) -> tuple[Path, int]:
    """Write ``model.cpu.onnx`` next to ``src`` (sharing its external data); returns (path, nodes rewritten)."""
    import onnx

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    count = rewrite_to_gqa(model, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    dst = src.with_name(CPU_FORM_NAME)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp, dst)
    return dst, count
