"""RMSNorm as one op in the CPU form: the exported ``Pow, ReduceMean, Add(eps), Sqrt, Reciprocal, Mul, Mul(weight)``
becomes ONNX ``RMSNormalization`` (opset 23), one pass in place of five over each norm's input (SmolLM2's int8 CPU
form: ~1.5% of its time at B8 x L128, one thread). Float rounding aside, the same function; only that exact chain is
taken (a cast to float32 inside, as fp16 graphs export it, leaves the norm as it is).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ort_rotary import small_constants


def _only_consumer(consumers: dict[str, list[Any]], name: str, op: str) -> Any:
    nodes = consumers.get(name, [])
    return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None


def _norm_at(pow_node: Any, consumers: dict[str, list[Any]], consts: dict[str, np.ndarray],
             weights: dict[str, tuple[int, ...]]) -> tuple[Any, float, str] | None:
    """(the norm's last node, eps, weight) for the chain that starts at ``pow_node``, or None."""
    x = pow_node.input[0]
    if consts.get(pow_node.input[1], np.array(0.0)).ravel().tolist() != [2.0]:
        return None
    mean = _only_consumer(consumers, pow_node.output[0], "ReduceMean")
    if mean is None or len(mean.input) < 2 or consts.get(mean.input[1], np.array(0)).ravel().tolist() != [-1]:
        return None
    if any(a.name == "keepdims" and a.i == 0 for a in mean.attribute):
        return None
    add = _only_consumer(consumers, mean.output[0], "Add")
    eps = consts.get(add.input[1]) if add is not None else None
    sqrt = _only_consumer(consumers, add.output[0], "Sqrt") if add is not None else None
    rec = _only_consumer(consumers, sqrt.output[0], "Reciprocal") if sqrt is not None else None
    mul = _only_consumer(consumers, rec.output[0], "Mul") if rec is not None else None
    if eps is None or eps.size != 1 or mul is None or x not in mul.input:
        return None
    scale = _only_consumer(consumers, mul.output[0], "Mul")
    w = next((i for i in scale.input if i != mul.output[0]), None) if scale is not None else None
    if w is None or len(weights.get(w, ())) != 1:
        return None
    return scale, float(eps.ravel()[0]), w


def fuse_rms_norms(model: Any) -> int:
    """Rewrite every exported RMSNorm chain of ``model`` (opset >= 23) into ``RMSNormalization``; returns how many.
    The chain's other nodes are left dead for the caller's pruning."""
    from onnx import helper

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 23:
        return 0
    g = model.graph
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = small_constants(g)
    weights = {t.name: tuple(t.dims) for t in g.initializer}
    fused: dict[int, Any] = {}
    for n in g.node:
        found = _norm_at(n, consumers, consts, weights) if n.op_type == "Pow" else None
        if found is not None:
            last, eps, w = found
            fused[id(last)] = helper.make_node("RMSNormalization", [n.input[0], w], list(last.output), axis=-1,
                                               epsilon=eps, name=f"{last.name}_rms")
    nodes = [fused.get(id(n), n) for n in g.node]
    del g.node[:]
    g.node.extend(nodes)
    return len(fused)
