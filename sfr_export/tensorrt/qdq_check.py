"""Q/DQ conformance: does an int8 ONNX follow TensorRT's explicit-quantization rules? Runs on CPU.

TensorRT 11 builds int8 engines only from explicit QuantizeLinear/DequantizeLinear nodes (no calibrators, no INT8
flag). What its ONNX parser and optimizer accept and fuse:

- symmetric quantization: signed int8, zero point 0 (``IDequantizeLayer`` rejects a non-zero zero point);
- activations per tensor; weights per tensor or per output channel, on the output-channel axis of the weight
  (MatMul ``B[K, N]``: axis 1; Gemm ``transB=1`` ``B[N, K]``: axis 0; Conv ``W[K, C, ...]``: axis 0);
- Q/DQ at the inputs of the weighted ops (MatMul, Gemm, Conv), an activation Q always followed by its DQ; weight-only
  quantization is a DequantizeLinear on an int8 initializer feeding the weight input of the linear op;
- only standard ONNX operators: ONNX Runtime's ``com.microsoft`` contrib ops (MatMulNBits, QGemm, ...) and the
  QOperator form (QLinearMatMul, MatMulInteger) are not parsed by TensorRT;
- never on integer tensors (ids, positions, shapes, the attention mask).

``check_qdq(path)`` returns a ``QdqReport``: truthy when the graph conforms, with the list of violations.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError

STANDARD_DOMAINS = ("", "ai.onnx")
LINEAR_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}  # op -> index of the weight input
QOPERATOR_OPS = {"QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "DynamicQuantizeLinear"}
PASSTHROUGH_OPS = {"Transpose", "Cast", "Identity", "Reshape"}
FLOAT_TYPES = {1, 10, 16}  # FLOAT, FLOAT16, BFLOAT16
INT_TYPES = {2, 3, 4, 5, 6, 7, 12, 13}  # uint8, int8, uint16, int16, int32, int64, uint32, uint64
INT8, UINT8 = 3, 2
_TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}


@dataclass(frozen=True)
class Violation:
    rule: str  # domain | qoperator | zero-point | signedness | scale | axis | placement | integer-tensor | block | empty
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class QdqReport:
    """Truthy when the graph conforms. ``violations`` fail the check, ``warnings`` are advisory."""

    model: str
    violations: list[Violation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return not self.violations

    @property
    def rules_failed(self) -> set[str]:
        return {v.rule for v in self.violations}

    def summary(self, limit: int = 3) -> str:
        if not self.violations:
            return f"{self.model}: conforms ({self.stats.get('dequantize', 0)} DequantizeLinear, {self.stats.get('quantized_linear', 0)}/{self.stats.get('linear', 0)} linear ops quantized)"
        shown = "; ".join(str(v) for v in self.violations[:limit])
        more = f" (+{len(self.violations) - limit} more)" if len(self.violations) > limit else ""
        return f"{len(self.violations)} violation(s): {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "passed": bool(self), "violations": [v.__dict__ for v in self.violations],
                "warnings": self.warnings, "stats": self.stats}


@dataclass(frozen=True)
class QdqCheckConfig:
    require_per_channel_weights: bool = True  # per-tensor weight scales lose accuracy on LLM weights
    require_quantized_nodes: bool = True  # a graph without any Q/DQ is not an explicitly quantized model


class _Graph:
    def __init__(self, model: Any, base_dir: Path | None):
        import onnx

        self.onnx = onnx
        self.base_dir = base_dir
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.constants = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in g.node:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((n, i))
        self.types: dict[str, int] = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.inits.items():
            self.types[name] = t.data_type

    def const_array(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            t = self.inits[name]
            return numpy_helper.to_array(t, base_dir=str(self.base_dir)) if self.base_dir else numpy_helper.to_array(t)
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.inits:
            return tuple(self.inits[name].dims)
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return tuple(a.t.dims)
        return None

    def const_dtype(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        node = self.constants.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return a.t.data_type
        return None

    def is_const(self, name: str) -> bool:
        return name in self.inits or name in self.constants


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _label(node: Any) -> str:
    return node.name or f"{node.op_type}({', '.join(node.output)})"


def load_for_check(path: Path) -> Any:
    """The graph without weights (external data stays on disk; only scales and zero points are read)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors have no common base
        raise ArtifactError(f"{path} is not a readable ONNX model (corrupt or truncated?): {exc}") from exc
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # inference is best effort: types from inputs/initializers still apply
        import logging

        logging.getLogger(__name__).debug("shape inference failed on %s: %s", path, exc)
    return model


def check_qdq(model: str | Path | Any, config: QdqCheckConfig = QdqCheckConfig(), *, base_dir: Path | None = None) -> QdqReport:
    """Check a model (path or ModelProto) against TensorRT's explicit-quantization rules."""
    label, model, base_dir = _load(model, base_dir)
    g = _Graph(model, base_dir)
    report = QdqReport(model=label)
    v = report.violations
    _check_domains(g, v)
    qs = [n for n in g.nodes if n.op_type == "QuantizeLinear" and n.domain in STANDARD_DOMAINS]
    dqs = [n for n in g.nodes if n.op_type == "DequantizeLinear" and n.domain in STANDARD_DOMAINS]
    stats = {"quantize": len(qs), "dequantize": len(dqs), "linear": sum(n.op_type in LINEAR_OPS for n in g.nodes),
             "weight_dq": 0, "activation_dq": 0, "quantized_linear": 0, "per_channel_weights": 0}
    if config.require_quantized_nodes and not qs and not dqs:
        v.append(Violation("empty", label, "no QuantizeLinear/DequantizeLinear nodes: not an explicitly quantized model"))
    for n in qs + dqs:
        _check_qparams(g, n, v)
    for q in qs:
        _check_quantize(g, q, v)
    quantized_linear: set[str] = set()
    for dq in dqs:
        _check_dequantize(g, dq, config, report, stats, quantized_linear)
    stats["quantized_linear"] = len(quantized_linear)
    report.stats = stats
    return report


def _load(model: str | Path | Any, base_dir: Path | None) -> tuple[str, Any, Path | None]:
    if isinstance(model, (str, Path)):
        return str(model), load_for_check(Path(model)), Path(model).parent
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # best effort: the checks that need types skip tensors without one
        pass
    return model.graph.name or "<model>", model, base_dir


def _check_domains(g: _Graph, v: list[Violation]) -> None:
    """Standard ONNX ops only, and no QOperator forms."""
    for n in g.nodes:
        if n.domain not in STANDARD_DOMAINS:
            v.append(Violation("domain", _label(n), f"operator {n.domain}::{n.op_type} is not a standard ONNX op; "
                               "TensorRT's parser cannot read ONNX Runtime contrib ops (use the Q/DQ form)"))
        elif n.op_type in QOPERATOR_OPS:
            v.append(Violation("qoperator", _label(n), f"{n.op_type} is the QOperator form; TensorRT needs "
                               "QuantizeLinear/DequantizeLinear around a float MatMul/Gemm"))


def _check_qparams(g: _Graph, n: Any, v: list[Violation]) -> None:
    _check_zero_point(g, n, v)
    _check_scale(g, n, v)
    if _attr(n, "block_size", 0):
        v.append(Violation("block", _label(n), f"block_size={_attr(n, 'block_size')}: TensorRT supports block "
                           "quantization only for 4-bit weights, int8 must be per-tensor or per-channel"))


def _check_quantize(g: _Graph, q: Any, v: list[Violation]) -> None:
    """A float input that is not an index/mask tensor; the output consumed by DequantizeLinear only."""
    x = q.input[0]
    dtype = g.types.get(x)
    if dtype in INT_TYPES:
        v.append(Violation("integer-tensor", _label(q), f"quantizes {x!r} of type {_TYPE_NAMES.get(dtype, dtype)}: "
                           "ids, positions, shapes and masks must stay integer"))
    prod = g.producer.get(x)
    if prod is not None and prod.op_type == "Cast" and g.types.get(prod.input[0]) in INT_TYPES:
        v.append(Violation("integer-tensor", _label(q), f"quantizes {x!r}, a cast of the integer tensor "
                           f"{prod.input[0]!r} (mask/index); keep it out of Q/DQ"))
    for c, _ in g.consumers.get(q.output[0], []):
        if c.op_type != "DequantizeLinear":
            v.append(Violation("placement", _label(q), f"QuantizeLinear output feeds {c.op_type} ({_label(c)}); "
                               "TensorRT needs every Q followed by its DQ"))


def _weight_of(g: _Graph, dq: Any) -> str | None:
    """The constant weight behind a DequantizeLinear (directly, or through Q(fp weight)), else None."""
    src = dq.input[0]
    if g.is_const(src):
        return src
    prod = g.producer.get(src)
    if prod is not None and prod.op_type == "QuantizeLinear" and g.is_const(prod.input[0]):
        return prod.input[0]  # Q(fp weight) -> DQ: TensorRT quantizes the weight at build time
    return None


def _check_dequantize(g: _Graph, dq: Any, config: QdqCheckConfig, report: QdqReport, stats: dict[str, int],
                      quantized_linear: set[str]) -> None:
    """Where a DequantizeLinear goes and, for a weight, on which axis its scales are."""
    v = report.violations
    src = dq.input[0]
    weight_name = _weight_of(g, dq)
    in_dtype = g.types.get(src) or (g.const_dtype(src) if g.is_const(src) else None)
    if in_dtype is not None and in_dtype in INT_TYPES and in_dtype not in (INT8, UINT8):
        v.append(Violation("integer-tensor", _label(dq), f"dequantizes {src!r} of type {_TYPE_NAMES.get(in_dtype, in_dtype)}; "
                           "only int8 Q/DQ is TensorRT's int8 path"))
    for consumer, idx, perm in _follow(g, dq.output[0]):
        if consumer.op_type not in LINEAR_OPS:
            kind = "weight" if weight_name else "activation"
            v.append(Violation("placement", _label(dq), f"{kind} DequantizeLinear feeds {consumer.op_type} "
                               f"({_label(consumer)}); TensorRT fuses Q/DQ only at MatMul/Gemm/Conv inputs"))
            continue
        quantized_linear.add(_label(consumer))
        if weight_name is not None:
            stats["weight_dq"] += 1
            _check_weight_axis(g, dq, consumer, idx, perm, weight_name, config, v, stats, report.warnings)
        else:
            stats["activation_dq"] += 1


def _follow(g: _Graph, tensor: str) -> list[tuple[Any, int, list[int] | None]]:
    """Consumers of ``tensor``, looking through Transpose/Cast/Identity/Reshape; with the accumulated permutation."""
    out: list[tuple[Any, int, list[int] | None]] = []
    stack: list[tuple[str, list[int] | None, int]] = [(tensor, None, 0)]
    while stack:
        name, perm, depth = stack.pop()
        for c, idx in g.consumers.get(name, []):
            if c.op_type in PASSTHROUGH_OPS and depth < 4:
                p = perm
                if c.op_type == "Reshape" or perm == [-1]:
                    p = [-1]  # sentinel: the axis can no longer be tracked
                elif c.op_type == "Transpose":
                    tp = [int(i) for i in (_attr(c, "perm", []) or [])]
                    p = [(perm[i] if perm else i) for i in tp] if tp else [-1]
                stack.append((c.output[0], p, depth + 1))
            else:
                out.append((c, idx, perm))
    return out


def _check_zero_point(g: _Graph, n: Any, v: list[Violation]) -> None:
    if len(n.input) < 3 or not n.input[2]:
        if n.op_type == "QuantizeLinear" and _attr(n, "output_dtype", 0) in (0, UINT8):
            v.append(Violation("signedness", _label(n), "QuantizeLinear without a zero point outputs uint8; "
                               "TensorRT needs signed int8 (zero point int8 0)"))
        return
    zp_name = n.input[2]
    dtype = g.const_dtype(zp_name) if g.is_const(zp_name) else g.types.get(zp_name)
    if dtype == UINT8:
        v.append(Violation("signedness", _label(n), f"zero point {zp_name!r} is uint8 (asymmetric, unsigned); "
                           "TensorRT needs int8 with zero point 0"))
    elif dtype is not None and dtype != INT8:
        v.append(Violation("signedness", _label(n), f"zero point {zp_name!r} is {_TYPE_NAMES.get(dtype, dtype)}; "
                           "TensorRT's int8 path needs int8"))
    zp = g.const_array(zp_name)
    if zp is None:
        v.append(Violation("zero-point", _label(n), f"zero point {zp_name!r} is not a constant"))
    elif np.any(zp != 0):
        v.append(Violation("zero-point", _label(n), f"zero point {zp_name!r} is not 0 (max |zp| = {int(np.abs(zp.astype(np.int64)).max())}): "
                           "TensorRT supports only symmetric quantization"))


def _check_scale(g: _Graph, n: Any, v: list[Violation]) -> None:
    scale = g.const_array(n.input[1]) if len(n.input) > 1 else None
    if scale is None:
        v.append(Violation("scale", _label(n), f"scale {n.input[1] if len(n.input) > 1 else '?'!r} is not a constant"))
        return
    if scale.ndim > 1:
        v.append(Violation("scale", _label(n), f"scale has shape {scale.shape}; int8 needs a scalar or a 1-D per-channel vector"))
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        v.append(Violation("scale", _label(n), "scale has non-positive or non-finite values"))


def _weight_out_axis(consumer: Any, idx: int, rank: int) -> int | None:
    """The output-channel axis of a weight (in the consumer's view) or None when ``idx`` is not the weight input."""
    if consumer.op_type == "MatMul":
        return rank - 1 if idx == 1 else None
    if consumer.op_type == "Gemm":
        if idx != 1:
            return None
        return 0 if _attr(consumer, "transB", 0) else 1
    if consumer.op_type in ("Conv",):
        return 0 if idx == 1 else None
    if consumer.op_type == "ConvTranspose":
        return 1 if idx == 1 else None
    return None


def _check_weight_axis(g: _Graph, dq: Any, consumer: Any, idx: int, perm: list[int] | None, weight: str,
                       config: QdqCheckConfig, v: list[Violation], stats: dict[str, int], warnings: list[str]) -> None:
    shape = g.const_shape(weight)
    scale_shape = g.const_shape(dq.input[1]) or ()
    per_channel = len(scale_shape) == 1 and int(np.prod(scale_shape)) > 1
    if shape is None:
        return
    rank = len(shape)
    want = _weight_out_axis(consumer, idx, rank)
    if want is None:
        if idx != 1 or consumer.op_type not in LINEAR_OPS:
            warnings.append(f"{_label(dq)}: constant DequantizeLinear feeds input {idx} of {consumer.op_type} "
                            f"({_label(consumer)}), not its weight input")
        return
    if not per_channel:
        if config.require_per_channel_weights:
            v.append(Violation("axis", _label(dq), f"weight {weight!r} {list(shape)} of {_label(consumer)} has a per-tensor "
                               "scale; use per-output-channel scales"))
        return
    stats["per_channel_weights"] += 1
    axis = int(_attr(dq, "axis", 1))
    axis = axis + rank if axis < 0 else axis
    if perm == [-1]:
        warnings.append(f"{_label(dq)}: weight reaches {_label(consumer)} through a Reshape; axis not verified")
        return
    # Map the consumer's output-channel axis back to the stored weight's axis through any Transpose.
    stored = perm[want] if perm else want
    if axis != stored:
        v.append(Violation("axis", _label(dq), f"weight {weight!r} {list(shape)} of {_label(consumer)} is quantized along "
                           f"axis {axis}; the output-channel axis is {stored}"))
    elif scale_shape[0] != shape[stored]:
        v.append(Violation("axis", _label(dq), f"weight {weight!r} has {shape[stored]} output channels but "
                           f"{scale_shape[0]} scales"))
