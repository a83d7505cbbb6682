"""RoPE into ``GroupQueryAttention``: the CPU form lets the attention op rotate Q and K itself (``do_rotary``).

The exported graph applies rotary embeddings as transformers writes them, ``x * cos + cat(-x2, x1) * sin`` on
``[B, H, L, D]``: per layer four Muls, two Slices, a Neg, a Concat and an Add for each of Q and K, each a pass over
the tensor. ``GroupQueryAttention`` with ``do_rotary = 1`` does the same in its kernel from ``cos_cache`` /
``sin_cache`` ``[positions, D / 2]`` (measured on SmolLM2's int8 CPU form: 4-5% of the whole graph's time at
B8 x L128, one thread; exact in float).

The caches are not rebuilt from a formula: the graph's own cos/sin subgraph is evaluated (ONNX Runtime, inputs of
the graph) for ``positions`` tokens, so any inv_freq, scaling or attention factor the export traced comes along. The
rewrite is taken only where that subgraph is proven to depend on the position alone (the same rows for a padded
and an unpadded batch, the first half of D equal to the second): what ``GroupQueryAttention`` assumes of a first
prompt (positions ``0 .. L - 1``, right padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RotaryUse:
    """One RoPE application found in the graph: ``x`` [B, H, L, D] rotated by the graph's ``cos`` and ``sin``."""

    x: str
    cos: str
    sin: str


def small_constants(graph: Any) -> dict[str, np.ndarray]:
    """Small constant tensors by name (inline initializers and Constant nodes)."""
    from onnx import TensorProto, helper, numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer
           if t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= 16}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(helper.get_attribute_value(n.attribute[0]))
    return out


def _slice_range(node: Any, consts: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last of 4 axes with step 1, from constant inputs; None otherwise."""
    ins = list(node.input) + [""] * (5 - len(node.input))
    if any(i and i not in consts for i in ins[1:5]):
        return None
    starts, ends = consts[ins[1]].ravel(), consts[ins[2]].ravel()
    axes = consts[ins[3]].ravel() if ins[3] else np.array([-1])
    steps = consts[ins[4]].ravel() if ins[4] else np.array([1])
    if starts.size != 1 or int(axes[0]) not in (-1, 3) or int(steps[0]) != 1:
        return None
    return int(starts[0]), int(ends[0])


def _rotate_half_of(node: Any, prod: dict[str, Any], consts: dict[str, np.ndarray], half: int) -> str | None:
    """``x`` when ``node`` is ``Concat(Neg(x[..., half:]), x[..., :half])`` on the last axis, else None."""
    from onnx import helper

    if node is None or node.op_type != "Concat" or len(node.input) != 2:
        return None
    if helper.get_attribute_value(node.attribute[0]) not in (-1, 3):
        return None
    neg, low = prod.get(node.input[0]), prod.get(node.input[1])
    if neg is None or neg.op_type != "Neg" or low is None or low.op_type != "Slice":
        return None
    high = prod.get(neg.input[0])
    if high is None or high.op_type != "Slice" or high.input[0] != low.input[0]:
        return None
    if _slice_range(low, consts) != (0, half):
        return None
    hr = _slice_range(high, consts)
    return low.input[0] if hr is not None and hr[0] == half and hr[1] >= 2 * half else None


def find_rotary(graph: Any, out: str, head_dim: int, prod: dict[str, Any] | None = None,
                consts: dict[str, np.ndarray] | None = None) -> RotaryUse | None:
    """The RoPE application whose result is ``out`` (``Add(Mul(x, cos), Mul(rotate_half(x), sin))``, operands in
    either order), or None when ``out`` is not one."""
    prod = prod if prod is not None else {o: n for n in graph.node for o in n.output}
    consts = consts if consts is not None else small_constants(graph)
    add = prod.get(out)
    if add is None or add.op_type != "Add":
        return None
    muls = [prod.get(i) for i in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for plain, turned in (muls, muls[::-1]):
        for j in (0, 1):
            x = _rotate_half_of(prod.get(turned.input[j]), prod, consts, head_dim // 2)
            if x is not None and x in plain.input:
                cos = plain.input[1] if plain.input[0] == x else plain.input[0]
                return RotaryUse(x=x, cos=cos, sin=turned.input[1 - j])
    return None


def subgraph(model: Any, outputs: list[str], base_dir: Path | None, cut: tuple[str, ...] = (),
             cut_type: int = 1) -> Any:
    """A model computing ``outputs`` from ``model``'s inputs (the nodes and initializers they need, loaded); the
    tensors ``cut`` become inputs of their own (element type ``cut_type``, float32 by default), and nothing upstream
    of them is taken."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_tensor

    g = model.graph
    needed, nodes = set(outputs), []
    for node in reversed(g.node):
        if any(o in needed and o not in cut for o in node.output):
            nodes.append(node)
            needed.update(i for i in node.input if i)
    inits = []
    for t in g.initializer:
        if t.name in needed:
            t2 = type(t)()
            t2.CopyFrom(t)
            if t2.data_location == TensorProto.EXTERNAL:
                load_external_data_for_tensor(t2, str(base_dir))
                t2.data_location = TensorProto.DEFAULT
                del t2.external_data[:]
            inits.append(t2)
    inputs = [i for i in g.input if i.name in needed] + [helper.make_tensor_value_info(c, cut_type, None) for c in cut]
    graph = helper.make_graph(list(reversed(nodes)), "sfr_sub", inputs, [], inits)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(sub).graph.value_info}
    sub.graph.output.extend(helper.make_tensor_value_info(o, types.get(o, TensorProto.FLOAT), None) for o in outputs)
    return sub


def rope_cache(model: Any, use: RotaryUse, positions: int, head_dim: int,
               base_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cos_cache, sin_cache)`` [positions, D / 2] from the graph's own cos/sin, or None where they depend on more
    than the position (or do not repeat across the two halves of D, as ``rotate_half`` RoPE does)."""
    import onnxruntime as ort

    names = [i.name for i in model.graph.input]
    sess = ort.InferenceSession(subgraph(model, [use.cos, use.sin], base_dir).SerializeToString(),
                                providers=["CPUExecutionProvider"])

    takes = {i.name for i in sess.get_inputs()}

    def run(mask: np.ndarray) -> list[np.ndarray]:
        out = sess.run(None, {k: v for k, v in {names[0]: np.ones_like(mask), names[1]: mask}.items() if k in takes})
        return [np.broadcast_to(t, (mask.shape[0], 1, mask.shape[1], head_dim)) for t in out]

    n = min(9, positions)
    short = np.ones((2, n), np.int64)
    short[1, n // 2:] = 0  # a right-padded row: the positions, not the mask, must decide
    long = run(np.ones((1, positions), np.int64))
    half = head_dim // 2
    for a, b in zip(run(short), long):
        if not (np.array_equal(a[0], a[1]) and np.allclose(a[0, 0], b[0, 0, :n], rtol=0, atol=1e-6)
                and np.array_equal(b[..., :half], b[..., half:])):
            return None
    return (np.ascontiguousarray(long[0][0, 0, :, :half]), np.ascontiguousarray(long[1][0, 0, :, :half]))


@dataclass(frozen=True)
class RotaryFusion:
    """Which attention nodes take RoPE in: the node's output name -> (Q, K) before rotation and the (cos, sin)
    cache names."""

    nodes: dict[str, tuple[str, str, str, str]]
    caches: list[Any]  # the cache initializers (TensorProto)


def plan_fusion(model: Any, head_dim: int, positions: int, base_dir: Path | None = None) -> RotaryFusion:
    """The attention nodes whose Q and K both carry one RoPE with a position-only cache of ``positions`` rows."""
    from onnx import numpy_helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    consts = small_constants(g)
    caches: dict[tuple[str, str], tuple[str, str] | None] = {}
    nodes: dict[str, tuple[str, str, str, str]] = {}
    inits = []
    for node in g.node:
        if node.op_type != "Attention" or positions <= 0:
            continue
        q, k = (find_rotary(g, node.input[j], head_dim, prod, consts) for j in (0, 1))
        if q is None or k is None or (q.cos, q.sin) != (k.cos, k.sin):
            continue
        if (q.cos, q.sin) not in caches:
            arrays = rope_cache(model, q, positions, head_dim, base_dir)
            tag = f"sfr_rope{len(caches)}"
            caches[(q.cos, q.sin)] = None if arrays is None else (f"{tag}_cos_cache", f"{tag}_sin_cache")
            if arrays is not None:
                inits += [numpy_helper.from_array(a, n) for a, n in zip(arrays, caches[(q.cos, q.sin)])]
        names = caches[(q.cos, q.sin)]
        if names is not None:
            nodes[node.output[0]] = (q.x, k.x, *names)
    return RotaryFusion(nodes, inits)
