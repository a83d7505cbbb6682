"""The ONNX Runtime CPU form of an exported graph: each ONNX ``Attention`` node becomes a contrib attention op.

ONNX Runtime's CPU kernel for the standard ``Attention`` op (opset 23/24) materialises a ``B x H x L x L`` score
buffer, and it refuses a key-padding mask that broadcasts over the query axis, so the portable encoder graph carries
its mask expanded to ``[B, 1, L, L]``. The CPU form rewrites every node, by the form the graph records:

- **causal** graphs -> ``com.microsoft.GroupQueryAttention``: ``seqlens_k = sum(attention_mask, 1) - 1`` (int32) and
  ``total_sequence_length = L``, computed once per graph; exact for the right-padded, mask-free causal graphs of
  :mod:`sfr_export.stages.export_graph`. A band mask input (sliding window) is dropped for
  ``local_window_size = window`` (checked against PyTorch past the window by the tests). Where Q and K carry RoPE
  with position-only cos/sin, the op takes them unrotated and rotates them itself (``do_rotary``, caches for the
  model's ``max_position_embeddings``; :mod:`.ort_rotary`).
- **key-padding** graphs (bidirectional encoders) -> ``com.microsoft.MultiHeadAttention`` with no mask input:
  Q gains a column of ones and K a column holding the key bias (0 for a real key, ``-1e4`` for padding, from the
  ``[B, L]`` ``attention_mask``, built once per graph as ``[B, H, L, 1]``), so ``q.k`` itself carries the mask.
  ONNX Runtime 1.32's CPU kernel takes its flash path only without ``key_padding_mask``/``attention_bias`` (with a
  2-D ``key_padding_mask`` it expands it to a float ``[B, L, L]`` and scores ``B x H x L x L`` per layer); the
  ``[B, 1, L, L]`` expansion the portable form needs is dead after the rewrite and pruned, so no tensor of the
  graph has two L axes. Exact: for a real key the extra term is ``1 x 0``.

Either way ``Q/K/V [B, H, L, D]`` go through ``Transpose(0, 2, 1, 3)`` -> ``Reshape [B, L, H*D]`` (the layout both
contrib ops read) and the output ``[B, L, H*D]`` goes back to ``[B, H, L, D]`` for the rest of the graph.

Every exported RMSNorm chain of the written form becomes one ``RMSNormalization`` op (:mod:`.ort_norms`).

The standard form stays the portable artifact (TensorRT, CUDA); this one is written next to it as ``model.cpu.onnx``,
sharing its external-data file.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import ExportValidationError
from .export_graph import META_ATTENTION, META_WINDOW, AttentionForm, AttentionPlan

CPU_FORM_NAME = "model.cpu.onnx"
_SEQLENS = "sfr_gqa_seqlens_k"
_TOTAL = "sfr_gqa_total_len"
_KEY_BIAS = "sfr_mha_key_bias"
_ONE = "sfr_mha_one"
_PAD_LAST = "sfr_mha_pad_last"  # Pad pads: one column after the head dim
MASKED_KEY_BIAS = -1.0e4  # added to q.k (before the scale) for a padding key; fits fp16, exp() of it is 0
_FLAT = "sfr_attn_bs_flat"  # Reshape target [0, 0, -1]: [B, L, H, D] -> [B, L, H*D]


def _const(name: str, values: list[int]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_node("Constant", [], [name], name=name,
                            value=helper.make_tensor(name + "_v", TensorProto.INT64, [len(values)], values))


def _gqa_inputs(mask: str, ids: str) -> list[Any]:
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
        _const(_FLAT, [0, 0, -1]),
    ]


def _mha_inputs(mask: str, heads: int, elem_type: int) -> list[Any]:
    """The key bias ``[B, H, L, 1]`` (0 for a real key, :data:`MASKED_KEY_BIAS` for padding), once per graph.

    Built in the attention's own float type (``elem_type``), so no layer needs a cast next to its Q/K: a second
    consumer of Q/K would keep ONNX Runtime from cancelling the Transposes around them (measured: +70 MB, slower).
    """
    from onnx import helper

    def scalar(name: str, value: float) -> Any:
        return helper.make_node("Constant", [], [name], name=name,
                                value=helper.make_tensor(name + "_v", elem_type, [], [value]))

    return [
        scalar(_ONE, 1.0),
        scalar("sfr_mha_big", -MASKED_KEY_BIAS),
        helper.make_node("Cast", [mask], ["sfr_mha_maskf"], to=elem_type, name="sfr_mha_maskf"),
        helper.make_node("Sub", ["sfr_mha_maskf", _ONE], ["sfr_mha_m1"], name="sfr_mha_m1"),  # 0 real, -1 pad
        helper.make_node("Mul", ["sfr_mha_m1", "sfr_mha_big"], ["sfr_mha_bias2"], name="sfr_mha_bias2"),
        _const("sfr_mha_axes", [1, 3]),
        helper.make_node("Unsqueeze", ["sfr_mha_bias2", "sfr_mha_axes"], ["sfr_mha_bias4"], name="sfr_mha_bias4"),
        _const("sfr_mha_heads", [1, heads, 1, 1]),
        helper.make_node("Expand", ["sfr_mha_bias4", "sfr_mha_heads"], [_KEY_BIAS], name=_KEY_BIAS),
        _const(_PAD_LAST, [0, 0, 0, 0, 0, 0, 0, 1]),
        _const(_FLAT, [0, 0, -1]),
    ]


def _elem_type(model: Any, name: str) -> int:
    """The ONNX element type of tensor ``name`` (from the graph's value_info, else from shape inference)."""
    import onnx

    for m in (model, None):
        g = m.graph if m is not None else onnx.shape_inference.infer_shapes(model).graph
        for v in (*g.value_info, *g.input, *g.output):
            if v.name == name and v.type.tensor_type.elem_type:
                return int(v.type.tensor_type.elem_type)
    raise ExportValidationError(f"cannot tell the float type of {name}, the first attention's query")


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _check_plain(node: Any) -> None:
    if any(node.input[4:]) or any(node.output[1:]):
        raise ExportValidationError(f"Attention node {node.name} has a KV cache or extra outputs; cannot rewrite it")


def _to_bsd(qkv: list[str], p: str) -> tuple[list[Any], list[str]]:
    """Q/K/V [B, H, L, D] -> [B, L, H*D]: the nodes and the three new names."""
    from onnx import helper

    out: list[Any] = []
    flat = []
    for name, tag in zip(qkv, "qkv"):
        out.append(helper.make_node("Transpose", [name], [f"{p}_{tag}t"], perm=[0, 2, 1, 3], name=f"{p}_{tag}t"))
        out.append(helper.make_node("Reshape", [f"{p}_{tag}t", _FLAT], [f"{p}_{tag}3"], name=f"{p}_{tag}3"))
        flat.append(f"{p}_{tag}3")
    return out, flat


def _from_bsd(out3: str, node: Any, p: str, heads: int, head_dim: int) -> list[Any]:
    """The contrib op's [B, L, H*D] output back to the [B, H, L, D] the rest of the graph reads."""
    from onnx import helper

    return [_const(f"{p}_shape4", [0, 0, heads, head_dim]),
            helper.make_node("Reshape", [out3, f"{p}_shape4"], [f"{p}_o4"], name=f"{p}_o4"),
            helper.make_node("Transpose", [f"{p}_o4"], [node.output[0]], perm=[0, 2, 1, 3], name=f"{p}_out")]


def _scale(node: Any, attrs: dict[str, Any]) -> dict[str, Any]:
    scale = _attr(node, "scale", None)
    return {**attrs, "scale": float(scale)} if scale is not None else attrs


def _replace_gqa(node: Any, i: int, *, heads: int, kv_heads: int, head_dim: int, window: int | None,
                 rope: dict[str, tuple[str, str, str, str]]) -> list[Any]:
    """The nodes that replace causal Attention node number ``i``; with an entry in ``rope`` (see
    :mod:`.ort_rotary`) the op takes Q and K before their rotary embedding and rotates them itself."""
    from onnx import helper

    _check_plain(node)
    mask = node.input[3] if len(node.input) > 3 else ""
    if mask and window is None:
        raise ExportValidationError(f"Attention node {node.name} takes a mask but the graph records no sliding "
                                    "window: it is not a causal-only graph")
    if not mask and not _attr(node, "is_causal", 0):
        raise ExportValidationError(f"Attention node {node.name} is neither causal nor windowed")
    p = f"sfr_gqa{i}"
    fused = rope.get(node.output[0])
    q, k = fused[:2] if fused else node.input[:2]
    out, flat = _to_bsd([q, k, node.input[2]], p)
    attrs = _scale(node, {"num_heads": heads, "kv_num_heads": kv_heads, "local_window_size": window or -1})
    caches = list(fused[2:]) if fused else []
    if fused:
        attrs["do_rotary"] = 1
    out.append(helper.make_node("GroupQueryAttention", [*flat, "", "", _SEQLENS, _TOTAL, *caches], [f"{p}_o3"],
                                domain="com.microsoft", name=f"{p}_gqa", **attrs))
    return out + _from_bsd(f"{p}_o3", node, p, heads, head_dim)


def _replace_mha(node: Any, i: int, *, heads: int, head_dim: int) -> list[Any]:
    """The nodes that replace key-padding Attention node number ``i`` (bidirectional).

    Q gains a last column of ones and K one of :data:`_KEY_BIAS`, so ``q'.k' = q.k + bias``: the padding keys are
    masked inside the dot product and ``MultiHeadAttention`` runs without a ``key_padding_mask``, which is what
    lets ONNX Runtime's CPU kernel take its flash path (tiles, no ``L x L`` scratch). V keeps its head size.
    """
    import math

    from onnx import helper

    _check_plain(node)
    if _attr(node, "is_causal", 0) or len(node.input) < 4 or not node.input[3]:
        raise ExportValidationError(f"Attention node {node.name} is causal or has no key-padding mask")
    q, k, v = node.input[:3]
    p = f"sfr_mha{i}"
    out = [helper.make_node("Pad", [q, _PAD_LAST, _ONE], [f"{p}_qa"], mode="constant", name=f"{p}_qa"),
           helper.make_node("Concat", [k, _KEY_BIAS], [f"{p}_ka"], axis=3, name=f"{p}_ka")]
    more, flat = _to_bsd([f"{p}_qa", f"{p}_ka", v], p)
    scale = float(_attr(node, "scale", None) or 1.0 / math.sqrt(head_dim))  # MHA's default would use D + 1
    out += more + [helper.make_node("MultiHeadAttention", flat, [f"{p}_o3"], domain="com.microsoft",
                                    name=f"{p}_mha", num_heads=heads, scale=scale)]
    return out + _from_bsd(f"{p}_o3", node, p, heads, head_dim)


def _prune(graph: Any) -> int:
    """Drop the nodes, value_info and initializers no graph output depends on; returns how many nodes went."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    dropped = len(graph.node) - len(keep)
    produced = {o for n in keep for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced]
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(reversed(keep))
    del graph.value_info[:]
    graph.value_info.extend(infos)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return dropped


def cpu_form_op(form: AttentionForm, heads: int, kv_heads: int) -> str | None:
    """The contrib op the CPU form runs attention with, or None where the graph has no CPU form."""
    if form is AttentionForm.CAUSAL:
        return "com.microsoft.GroupQueryAttention"
    if form is AttentionForm.KEY_PADDING and kv_heads == heads:
        return "com.microsoft.MultiHeadAttention"
    return None


def rewrite_attention(model: Any, *, heads: int, kv_heads: int, head_dim: int, max_positions: int = 0,
                      base_dir: Path | None = None) -> int:
    """Rewrite every ``Attention`` node of an exported ONNX ModelProto in place (GQA or MHA by its recorded form).

    With ``max_positions`` (the model's, > 0), a causal layer's RoPE moves into its ``GroupQueryAttention`` where
    :func:`.ort_rotary.plan_fusion` proves it position-only (``base_dir``: where the external data lies).
    Returns how many nodes were rewritten; nodes left dead by the rewrite (the encoder's mask expansion, the RoPE
    taken in) are pruned.
    """
    from onnx import helper

    from .ort_rotary import plan_fusion

    meta = {p.key: p.value for p in model.metadata_props}
    form = meta.get(META_ATTENTION, "unrecorded")
    g = model.graph
    inputs = [i.name for i in g.input]
    if form == AttentionForm.CAUSAL.value:
        window = int(meta.get(META_WINDOW, "0")) or None
        nodes: list[Any] = _gqa_inputs(inputs[1], inputs[0])
        rope = plan_fusion(model, head_dim, max_positions, base_dir)
        g.initializer.extend(rope.caches)
        replace = partial(_replace_gqa, heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=window,
                          rope=rope.nodes)
    elif form == AttentionForm.KEY_PADDING.value and kv_heads == heads:
        first = next((n for n in g.node if n.op_type == "Attention"), None)
        nodes = _mha_inputs(inputs[1], heads, _elem_type(model, first.input[0])) if first is not None else []
        replace = partial(_replace_mha, heads=heads, head_dim=head_dim)
    else:
        raise ExportValidationError(f"no ONNX Runtime CPU form for a {form} graph with {heads}/{kv_heads} heads")
    count = 0
    for node in g.node:
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            nodes.extend(replace(node, count))
            count += 1
        else:
            nodes.append(node)
    if count == 0:
        raise ExportValidationError("the graph has no ONNX Attention node to rewrite (exported below opset 23?)")
    del g.node[:]
    g.node.extend(nodes)
    _prune(g)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def write_cpu_form(src: Path, plan: AttentionPlan, dst: Path | None = None, *,
                   pooled_tail: bool = True) -> tuple[Path, int]:
    """Write the CPU form of ``src`` to ``dst`` (default ``model.cpu.onnx`` next to it, sharing its external data;
    ``dst = src`` rewrites in place, atomically) for the export's attention ``plan``; returns (path, nodes
    rewritten). ``pooled_tail``: a last-token graph runs its last layer's tail on the pooled rows only
    (stages.ort_tail), which leaves the embeddings as they are but not the other rows of that tail."""
    import onnx

    from .ort_norms import fuse_rms_norms
    from .ort_tail import trim_tail

    src = Path(src)
    model = onnx.load(str(src), load_external_data=False)
    count = rewrite_attention(model, heads=plan.num_heads, kv_heads=plan.kv_heads, head_dim=plan.head_dim,
                              max_positions=plan.max_positions, base_dir=src.parent)
    if fuse_rms_norms(model) + (trim_tail(model, src.parent) if pooled_tail else 0):
        _prune(model.graph)
    dst = src.with_name(CPU_FORM_NAME) if dst is None else Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(model.SerializeToString())
    os.replace(tmp, dst)
    return dst, count
