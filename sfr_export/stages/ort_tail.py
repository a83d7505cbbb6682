"""Last-token pooling reads one row per text: the CPU form runs the last layer's tail on those rows alone.

After the last attention op every node up to the pooling works row by row: ``o_proj``, the residual Add, the MLP,
the final norm (and in an int8 form each linear's per-token quantization and its float channels). With last-token
pooling only each text's pooled row of that tail reaches the output. The rewrite gathers the pooled row ``[B, 1, W]``
of every hidden-state tensor the tail reads (the attention output and the residual stream), lets the tail run on
those B rows instead of B x L, and drops the pooling's own gather: a text's embedding is computed by the same
arithmetic, on the same row (SmolLM2's int8 CPU form, 30 layers: 1.06x at B8 x L128, one thread, docs/int8.md).

The rewrite is taken only where it is proven: the tail, cut out of the graph with its entries as inputs, gives the
same pooled rows before and after on a right-padded random batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..quant.qdq import DIGIT_INDEX, DIGIT_VALID, POOLED_INDEX  # in the tail every row is a pooled row, at position 0

ATTENTION_OPS = ("GroupQueryAttention", "MultiHeadAttention", "Attention")
SHAPE_OPS = ("Reshape", "Transpose")


@dataclass(frozen=True)
class Tail:
    """The nodes between the last attention and the pooling (their positions in the graph), the hidden-state
    tensors they read from outside (``entries``), and the pooling node's position (a ``GatherElements`` on axis 1)."""

    nodes: frozenset[int]
    entries: tuple[str, ...]
    pool: int


def _cone(graph: Any, start: set[str], forward: bool) -> set[int]:
    """Positions of the nodes downstream (``forward``) of the tensors ``start``, or upstream of them."""
    names, found = set(start), set()
    nodes = list(enumerate(graph.node))
    for k, n in (nodes if forward else reversed(nodes)):
        if (forward and any(i in names for i in n.input)) or (not forward and any(o in names for o in n.output)):
            found.add(k)
            names.update(n.output if forward else (i for i in n.input if i))
    return found


def _pooling(graph: Any, hidden: set[int]) -> int | None:
    """The graph's last-token pooling (its position): the last ``GatherElements`` on axis 1 whose index does not
    come from the hidden states (the nodes ``hidden``) but from the attention mask alone, or None."""
    prod = {o: k for k, n in enumerate(graph.node) for o in n.output}
    gathers = [k for k, n in enumerate(graph.node) if n.op_type == "GatherElements"
               and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    for k in reversed(gathers):
        index = prod.get(graph.node[k].input[1])
        if index is not None and index not in hidden:
            return k
    return None


def _attention_output(graph: Any) -> str | None:
    """The last attention op's output, followed through the reshapes and transposes that only lay it out."""
    attn = [n for n in graph.node if n.op_type in ATTENTION_OPS]
    if not attn:
        return None
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = attn[-1].output[0]
    while len(consumers.get(out, [])) == 1 and consumers[out][0].op_type in SHAPE_OPS:
        out = consumers[out][0].output[0]
    return out


def find_tail(graph: Any) -> Tail | None:
    """The row-wise tail of a last-token graph, or None where the graph has no attention op or no such pooling."""
    hidden = _cone(graph, {graph.input[0].name}, True)
    pool, start = _pooling(graph, hidden), _attention_output(graph)
    if pool is None or start is None:
        return None
    nodes = _cone(graph, {start}, True) & _cone(graph, {graph.node[pool].input[0]}, False)
    prod = {o: k for k, n in enumerate(graph.node) for o in n.output}
    entries = []
    for k in sorted(nodes):
        for i in graph.node[k].input:
            src = prod.get(i)
            if src is not None and src not in nodes and src in hidden and i not in entries:
                entries.append(i)
    return Tail(frozenset(nodes), tuple(entries), pool) if start in entries else None


def _index_nodes(pool: Any) -> list[Any]:
    """``sfr_tail_pos`` [B, 1]: each text's pooled position, from the pooling's own index ([B, 1, W], one value per
    row)."""
    from onnx import helper

    return [helper.make_node("Gather", [pool.input[1], "sfr_tail_0"], ["sfr_tail_pos"], name="sfr_tail_Pos", axis=2)]


def _index_inits() -> list[Any]:
    from onnx import numpy_helper

    arrays = {"sfr_tail_0": np.asarray(0, np.int64), "sfr_tail_axes": np.asarray([1], np.int64),
              "sfr_tail_keep_row": np.asarray([1, 0], np.int64), "sfr_tail_one": np.asarray(1.0, np.float32)}
    return [numpy_helper.from_array(v, k) for k, v in arrays.items()]


def _topological(graph: Any) -> None:
    """Order ``graph``'s nodes so that each comes after the producers of its inputs (Kahn's algorithm, the present
    order among the nodes that are ready)."""
    import heapq

    nodes = list(graph.node)
    prod = {o: k for k, n in enumerate(nodes) for o in n.output}
    deps = [{prod[i] for i in n.input if i in prod} for n in nodes]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users.get(k, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def _apply(graph: Any, tail: Tail) -> None:
    """Rewrite ``graph`` in place: the tail reads each entry's pooled row, and the pooling passes its input on."""
    from onnx import helper

    pool = graph.node[tail.pool]
    new = _index_nodes(pool)
    swap = {}
    for e in tail.entries:
        new += [helper.make_node("GatherND", [e, "sfr_tail_pos"], [f"{e}_tail2"], name=f"{e}_TailGather", batch_dims=1),
                helper.make_node("Unsqueeze", [f"{e}_tail2", "sfr_tail_axes"], [f"{e}_tail"], name=f"{e}_Tail")]
        swap[e] = f"{e}_tail"
    if any(i in (POOLED_INDEX, DIGIT_INDEX) for k in tail.nodes for i in graph.node[k].input):
        new.append(helper.make_node("Mul", [POOLED_INDEX, "sfr_tail_keep_row"], ["sfr_tail_rows"], name="sfr_tail_Rows"))
        swap.update({POOLED_INDEX: "sfr_tail_rows", DIGIT_INDEX: "sfr_tail_rows", DIGIT_VALID: "sfr_tail_one"})
    for k in tail.nodes:
        n = graph.node[k]
        for j, i in enumerate(n.input):
            n.input[j] = swap.get(i, i)
    pooled, data = pool.output[0], pool.input[0]
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i == pooled:
                n.input[k] = data
    resized = {o for k in tail.nodes for o in graph.node[k].output} | {pooled}
    infos = [v for v in graph.value_info if v.name not in resized]  # their recorded shapes had L rows
    del graph.value_info[:]
    graph.value_info.extend(infos)
    graph.initializer.extend(_index_inits())
    graph.node.extend(new)
    _topological(graph)


def _entry_type(graph: Any, name: str) -> tuple[int, int] | None:
    """(last dim, element type) of hidden-state tensor ``name``: the input dim of the first weight, or the size of
    the first 1-D weight, that the nodes downstream of it meet (a MatMul's K, a norm's scale), and the type of the
    first float initializer they meet."""
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    inits = {t.name: t for t in graph.initializer}
    names, width, dtype = {name}, None, None
    for n in graph.node:
        if not any(i in names for i in n.input):
            continue
        dtype = dtype or next((inits[i].data_type for i in n.input if i in inits and inits[i].data_type in floats), None)
        dims = [tuple(inits[i].dims) if i in inits else () for i in n.input]
        if width is None and n.op_type in ("MatMul", "MatMulIntegerToFloat") and len(dims[1]) == 2:
            width = int(dims[1][0])
        one_d = [d[0] for d in dims if len(d) == 1 and d[0] > 1]
        if width is None and n.op_type in ("RMSNormalization", "SimplifiedLayerNormalization", "Mul", "Add") and one_d:
            width = int(one_d[0])
        if width is not None and dtype is not None:
            return width, dtype
        names.update(n.output)
    return None


def _proven(before: Any, after: Any, tail: Tail, pooled: str, base_dir: Path | None) -> bool:
    """The tail, cut out of ``before`` and ``after`` with its entries as inputs, gives the same pooled rows on a
    random right-padded batch (and a one-token text)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from .ort_rotary import subgraph

    types = {e: _entry_type(before.graph, e) for e in tail.entries}
    if None in types.values() or len({t for _, t in types.values()}) != 1:
        return False
    dtype = next(iter(types.values()))[1]
    rng = np.random.default_rng(0)
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    feeds = {e: rng.normal(0, 1, (3, 7, w)).astype(helper.tensor_dtype_to_np_dtype(t)) for e, (w, t) in types.items()}
    feeds.update({i.name: (mask if "mask" in i.name else np.full_like(mask, 7)) for i in before.graph.input})
    out = []
    for model, name in ((before, before.graph.node[tail.pool].output[0]), (after, pooled)):
        sub = subgraph(model, [name], base_dir, cut=tail.entries, cut_type=dtype)
        sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
        out.append(sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0])
    a, b = (o.astype(np.float64) for o in out)
    tol = 1e-5 if dtype == TensorProto.FLOAT else 1e-3  # fp16's MatMul may sum B rows in another order than B x L
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=tol, atol=tol * np.abs(a).max()))


def trim_tail(model: Any, base_dir: Path | None = None) -> int:
    """Run ``model``'s last-layer tail on the pooled rows alone (in place) where that is proven; returns the number
    of tail nodes now on B rows (0: left as it was). Dead nodes are left for the caller's pruning."""
    import copy

    tail = find_tail(model.graph)
    if tail is None:
        return 0
    after = copy.deepcopy(model)  # the same node order: the tail's positions hold there too
    _apply(after.graph, tail)
    if not _proven(model, after, tail, model.graph.node[tail.pool].input[0], base_dir):
        return 0
    model.CopyFrom(after)
    return len(tail.nodes)
