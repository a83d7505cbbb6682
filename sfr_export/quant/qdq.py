"""ONNX graph side of int8: map MatMuls to torch linears, fold SmoothQuant, insert explicit Q/DQ, stream weights.

The explicit-quantization form TensorRT 11 consumes (standard ONNX ops only):
- weights: int8 initializer -> ``DequantizeLinear(axis=1)`` (symmetric per output channel, zero point 0) -> MatMul B;
- activations, only on MatMuls marked W8A8: ``QuantizeLinear -> DequantizeLinear`` with one static per-tensor scale
  (int8 zero point 0) on input A;
- Q/DQ only on MatMul inputs; attention-mask and position math stay float.

The CPU form uses ONNX Runtime contrib ops, per MatMul:
- ``nbits8``: ``com.microsoft.MatMulNBits`` (8-bit, symmetric, blockwise along K; with accuracy_level 4 the
  activations are quantized per block of K at run time, which contains per-channel outliers), its weight packed by
  onnxruntime's own ``DefaultWeightOnlyQuantizer.qbits_block_quant`` one tensor at a time (ORT's
  ``MatMulNBitsQuantizer`` loads the whole model into memory first);
- ``row8``: the activation quantized per row (token) at run time, symmetric, as uint8 with zero point 128, into
  ``com.microsoft.MatMulIntegerToFloat`` (u8 x s8 GEMM, per-output-channel weight scales), then times the row scale.

Weights are read one tensor at a time (memory-mapped when external) and written straight to the output's external
data file when the model is large, so quantizing never holds a second copy of the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError
from .observe import QMAX, act_scale, quantize_weight
from .rotation import Rotation, onnx_rotation

log = logging.getLogger(__name__)

EXTERNAL_THRESHOLD = 1_800_000_000
MODES = ("w8a8", "w8", "float", "nbits8", "row8")  # nbits8 / row8: the CPU form (com.microsoft ops, not TensorRT)


@dataclass(frozen=True)
class MatMulInfo:
    module: str  # torch module name (without the export wrapper's "backbone." prefix)
    node: str
    weight: str  # initializer name of B ([in, out])
    activation: str  # tensor name of A
    bias_add: str | None = None  # Add node adding the bias, when the linear has one
    bias: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing tensors without holding the model twice
# ---------------------------------------------------------------------------------------------------------------
def read_tensor(t: Any, base_dir: Path) -> np.ndarray:
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(t):
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = numpy_helper.helper.tensor_dtype_to_np_dtype(t.data_type)
    offset = int(info.get("offset", 0))
    shape = tuple(int(d) for d in t.dims)
    return np.memmap(base_dir / info["location"], dtype=dtype, mode="r", offset=offset, shape=shape)


class TensorWriter:
    """Makes initializers: embedded when small models, appended to ``<model>.data`` otherwise."""

    def __init__(self, out_path: Path, *, external: bool):
        self.out_path = Path(out_path)
        self.external = external
        self.data_name = self.out_path.name + ".data"
        self._fh = open(self.out_path.parent / self.data_name, "wb") if external else None
        self._offset = 0

    def make(self, name: str, arr: np.ndarray) -> Any:
        from onnx import TensorProto, numpy_helper

        arr = np.ascontiguousarray(arr)
        if self._fh is None or arr.nbytes < 1024:
            return numpy_helper.from_array(np.asarray(arr), name)
        t = TensorProto()
        t.name = name
        t.data_type = numpy_helper.helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        pad = (-self._offset) % 64
        self._fh.write(b"\0" * pad)
        self._offset += pad
        for k, v in (("location", self.data_name), ("offset", str(self._offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
        self._fh.write(arr.tobytes())
        self._offset += arr.nbytes
        return t

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---------------------------------------------------------------------------------------------------------------
# Mapping MatMuls to torch linears
# ---------------------------------------------------------------------------------------------------------------
def _scope(node: Any) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast

            scopes = ast.literal_eval(p.value)
            if len(scopes) >= 2:
                return str(scopes[-2])
    return None


def map_matmuls(model: Any, linear_shapes: dict[str, tuple[int, int]]) -> dict[str, MatMulInfo]:
    """Torch linear name -> the MatMul that computes it (via the exporter's name-scope metadata)."""
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: dict[str, MatMulInfo] = {}
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) != 2 or n.input[1] not in inits:
            continue
        scope = _scope(n)
        if scope is None:
            continue
        name = scope.removeprefix("backbone.")
        if name not in linear_shapes:
            continue
        out_f, in_f = linear_shapes[name]
        dims = tuple(int(d) for d in inits[n.input[1]].dims)
        if dims != (in_f, out_f):
            raise CalibrationError(f"MatMul {n.name} for {name} has weight shape {dims}, expected {(in_f, out_f)}")
        if len(consumers.get(n.input[1], [])) != 1:
            raise CalibrationError(f"weight {n.input[1]} of {name} is shared by several nodes: cannot quantize it alone")
        bias_add = bias = None
        for c in consumers.get(n.output[0], []):
            if c.op_type == "Add":
                other = [i for i in c.input if i != n.output[0]]
                if other and other[0] in inits and tuple(inits[other[0]].dims) == (out_f,):
                    bias_add, bias = c.name, other[0]
        if name in out:
            raise CalibrationError(f"linear {name} maps to two MatMuls ({out[name].node}, {n.name})")
        out[name] = MatMulInfo(module=name, node=n.name, weight=n.input[1], activation=n.input[0],
                               bias_add=bias_add, bias=bias)
    if not out:
        raise CalibrationError("no MatMul with a constant weight could be mapped to a torch linear layer: the ONNX graph "
                               "is not Q/DQ-compatible (export it with `sfr-export export`, dynamo exporter)")
    return out


def norm_mul_for(model: Any, activation: str, channels: int) -> tuple[Any, int] | None:
    """The RMSNorm ``Mul(weight, x)`` node producing ``activation`` and the input index of its [C] initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if activation in n.output and n.op_type == "Mul":
            for k, i in enumerate(n.input):
                if i in inits and tuple(int(d) for d in inits[i].dims) == (channels,):
                    return n, k
    return None


# ---------------------------------------------------------------------------------------------------------------
# The row-index tensors of the pooled-row digit ([B, 2] and [2B, 2] (row, position), [2B, 1] 0/1 weights): made
# once per graph, and read again by stages.ort_tail where the last layer runs on the pooled rows only
POOLED_INDEX = "sfr_pooled_idx"
DIGIT_INDEX = "sfr_digit_idx"
DIGIT_VALID = "sfr_digit_valid"

# Building the quantized graph
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantPlan:
    modes: dict[str, str]  # torch linear name -> one of MODES
    act_thresholds: dict[str, float]  # torch linear name -> activation abs threshold (for w8a8)
    nbits_block_size: int = 32  # nbits8: weight block along K
    nbits_accuracy_level: int = 4  # nbits8: 4 = int8 compute (activations quantized blockwise at run time)
    # torch linear name -> the online rotation of its input (sfr_export.quant.rotation); ``weight_of`` must then
    # return the rotated weight ``W R``
    rotations: dict[str, Rotation] = field(default_factory=dict)
    # w8a8: the first ``prefix_float`` positions (axis 1) skip activation quantization: the MatMul is split into a
    # float-activation MatMul on them (same int8 weight) and a Q/DQ MatMul on the rest, concatenated (right padding)
    prefix_float: int = 0
    # w8a8: each text's pooled position (as for ``pooled_exact``) keeps float activations: that row goes through the
    # same dequantized int8 weight in a float MatMul on B rows and overwrites its Q/DQ result (GatherND, ScatterND)
    pooled_float: bool = False
    # row8: each text's pooled position (the last attended one, as last-token pooling takes it) gets a second int8
    # digit, the per-token rounding residual quantized again, through the same int8 weight: that row's activations
    # are then ~15-bit exact, for one more MatMulIntegerToFloat on B rows and a ScatterND per MatMul
    pooled_exact: bool = False
    # row8 with ``pooled_exact``: each text's first attended position gets the second digit as well. That row is the
    # attention sink every later row reads (its keys and values), and its massive activations make its per-token
    # scale the coarsest; one more row per text in the same B-row MatMul and ScatterND
    first_exact: bool = False
    # row8: torch linear name -> input channels that stay float (sfr_export.quant.fold's massive channels): zeroed
    # before the per-token quantization (and in the int8 weight), their product added back by a float MatMul
    float_channels: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # w8/w8a8/row8: a sfr_export.quant.gptq.MomentStore of the MatMul inputs (in the basis the written graph feeds
    # them): the int8 weights are then rounded by GPTQ on those inputs (same scales, other integers); None: to nearest
    moments: Any = None


def pack_nbits8(w_kn: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blockwise packing of a [K, N] weight for ``MatMulNBits`` (onnxruntime's own C++ packer)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    qz = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8))
    packed, scales, _zp = qz.qbits_block_quant(np.ascontiguousarray(w_kn, dtype=np.float32))
    return packed, np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)


@dataclass
class _Edit:
    """What a form writer adds to the graph: new initializers, nodes, and the tensor renames of its MatMuls."""

    writer: TensorWriter
    plan: QuantPlan
    new_inits: list[Any] = field(default_factory=list)
    pre_nodes: list[Any] = field(default_factory=list)  # weight DequantizeLinear nodes, before everything
    replaced: dict[str, str] = field(default_factory=dict)  # initializer -> its replacement
    node_form: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # MatMul node -> (mode, tensors)
    shared: dict[str, str] = field(default_factory=dict)  # per-activation tensors made once (Q/DQ, row8, rotation)
    qdq_pairs: int = 0
    opset: int = 23  # the graph's default-domain opset (blocked QuantizeLinear needs 21)
    rounding: list[float] = field(default_factory=list)  # GPTQ's output error / round-to-nearest's, per weight
    factor: tuple[Any, Any] = (None, None)  # GPTQ: the last input moment's digest and its inverse factor


# --- one writer per form: the weight side (called once per MatMul, one tensor at a time) ---------------------------
def _weight_float(e: _Edit, info: MatMulInfo, w_t: np.ndarray) -> None:
    e.new_inits.append(e.writer.make(f"{info.weight}_sfr", w_t))
    e.replaced[info.weight] = f"{info.weight}_sfr"


def _weight_qdq(e: _Edit, info: MatMulInfo, w_t: np.ndarray) -> None:
    """TensorRT form: int8 per output channel behind ``DequantizeLinear(axis=1)``, zero point 0."""
    from onnx import TensorProto, helper

    q, s = _round_weight(e, info, w_t, ())
    e.new_inits += [e.writer.make(f"{info.weight}_q", q),
                    helper.make_tensor(f"{info.weight}_scale", TensorProto.FLOAT, [len(s)], s.tolist()),
                    helper.make_tensor(f"{info.weight}_zp", TensorProto.INT8, [len(s)], [0] * len(s))]
    e.pre_nodes.append(helper.make_node("DequantizeLinear", [f"{info.weight}_q", f"{info.weight}_scale", f"{info.weight}_zp"],
                                        [f"{info.weight}_dq"], name=f"{info.node}_w_dq", axis=1))
    e.replaced[info.weight] = f"{info.weight}_dq"


def _weight_nbits8(e: _Edit, info: MatMulInfo, w_t: np.ndarray) -> None:
    packed, sc = pack_nbits8(w_t, e.plan.nbits_block_size)
    e.new_inits += [e.writer.make(f"{info.weight}_nb8", packed), e.writer.make(f"{info.weight}_nb8_scales", sc)]
    e.node_form[info.node] = ("nbits8", (str(w_t.shape[0]), str(w_t.shape[1]), f"{info.weight}_nb8", f"{info.weight}_nb8_scales"))
    e.replaced[info.weight] = f"{info.weight}_nb8"


def _weight_row8(e: _Edit, info: MatMulInfo, w_t: np.ndarray) -> None:
    keep = list(e.plan.float_channels.get(info.module, ()))
    if keep:  # those rows stay float, in their own [K, N] weight; the int8 weight sees zeros there
        e.new_inits.append(e.writer.make(f"{info.weight}_r8_float_rows", np.ascontiguousarray(w_t[keep])))
        _split_inits(e, int(w_t.shape[0]), tuple(keep))
        w_t = w_t.copy()
        w_t[keep] = 0.0
    q, s = _round_weight(e, info, w_t, tuple(keep))
    e.new_inits += [e.writer.make(f"{info.weight}_r8", q), e.writer.make(f"{info.weight}_r8_scale", np.asarray(s, np.float32))]
    e.node_form[info.node] = ("row8", (f"{info.weight}_r8", f"{info.weight}_r8_scale", str(w_t.shape[0])))
    e.replaced[info.weight] = f"{info.weight}_r8"


def _round_weight(e: _Edit, info: MatMulInfo, w_t: np.ndarray, keep: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel int8 of a [K, N] weight: by GPTQ on the plan's moments of its input when it has them (the
    ratio of its output error to round-to-nearest's kept in ``e.rounding``), else to nearest."""
    import hashlib

    from .gptq import gptq_int8, inverse_factor, output_error

    h = e.plan.moments.get(info.module) if e.plan.moments is not None else None
    if h is None:
        return quantize_weight(w_t, axis=1)
    key = (hashlib.blake2b(np.ascontiguousarray(h).tobytes(), digest_size=16).digest(), keep)
    if e.factor[0] != key:  # linears reading one input come one after another (q/k/v, gate/up): keep the last factor
        e.factor = (key, inverse_factor(h, keep))
    q, s = gptq_int8(w_t, h, keep, factor=e.factor[1])
    q0, s0 = quantize_weight(w_t, axis=1)
    e.rounding.append(output_error(w_t, q, s, h) / max(output_error(w_t, q0, s0, h), 1e-30))
    return q, s


WEIGHT_WRITERS: dict[str, Callable[[_Edit, MatMulInfo, np.ndarray], None]] = {
    "float": _weight_float, "w8": _weight_qdq, "w8a8": _weight_qdq, "nbits8": _weight_nbits8, "row8": _weight_row8}


# --- the activation side: rewrite one MatMul node (its input already rotated when planned) --------------------------
def _act_w8a8(e: _Edit, n: Any, info: MatMulInfo, nodes: list[Any]) -> Any:
    """A static per-tensor symmetric ``QuantizeLinear -> DequantizeLinear`` on input A (shared by its readers); with
    ``prefix_float`` the leading positions bypass it through their own MatMul."""
    from onnx import TensorProto, helper

    a = n.input[0]
    p = e.plan.prefix_float
    if p and f"head:{a}" not in e.shared:
        e.new_inits += [helper.make_tensor(f"{a}_pf_0", TensorProto.INT64, [1], [0]),
                        helper.make_tensor(f"{a}_pf_p", TensorProto.INT64, [1], [p]),
                        helper.make_tensor(f"{a}_pf_end", TensorProto.INT64, [1], [2 ** 62]),
                        helper.make_tensor(f"{a}_pf_axis", TensorProto.INT64, [1], [1])]
        nodes += [helper.make_node("Slice", [a, f"{a}_pf_0", f"{a}_pf_p", f"{a}_pf_axis"], [f"{a}_head"], name=f"{a}_Head"),
                  helper.make_node("Slice", [a, f"{a}_pf_p", f"{a}_pf_end", f"{a}_pf_axis"], [f"{a}_tail"], name=f"{a}_Tail")]
        e.shared[f"head:{a}"] = f"{a}_head"
    q_in = f"{a}_tail" if p else a
    if a not in e.shared:
        thr = e.plan.act_thresholds.get(info.module)
        if thr is None or not np.isfinite(thr):
            raise CalibrationError(f"no calibrated activation range for {info.module}")
        pre = f"{a}_act"
        e.new_inits += [helper.make_tensor(f"{pre}_scale", TensorProto.FLOAT, [], [act_scale(thr)]),
                        helper.make_tensor(f"{pre}_zp", TensorProto.INT8, [], [0])]
        nodes.append(helper.make_node("QuantizeLinear", [q_in, f"{pre}_scale", f"{pre}_zp"], [f"{pre}_q"], name=f"{pre}_Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{pre}_q", f"{pre}_scale", f"{pre}_zp"], [f"{pre}_dq"], name=f"{pre}_DQ"))
        e.shared[a] = f"{pre}_dq"
        e.qdq_pairs += 1
    w = e.replaced.get(n.input[1], n.input[1])
    out = n.output[0]
    if not p:
        q = helper.make_node("MatMul", [e.shared[a], w], [out], name=n.name)
    else:
        nodes += [helper.make_node("MatMul", [e.shared[f"head:{a}"], w], [f"{out}_head"], name=f"{n.name}_head"),
                  helper.make_node("MatMul", [e.shared[a], w], [f"{out}_tail"], name=f"{n.name}_tail")]
        q = helper.make_node("Concat", [f"{out}_head", f"{out}_tail"], [out], name=f"{n.name}_concat", axis=1)
    return _pooled_float(e, q, a, w, nodes) if e.plan.pooled_float else q


def _pooled_float(e: _Edit, q: Any, a: str, w: str, nodes: list[Any]) -> Any:
    """The pooled rows of W8A8 output ``q``, recomputed from float activation ``a`` through weight ``w``."""
    from onnx import helper

    _pooled_index(e, nodes)
    out = q.output[0]
    q.output[0] = f"{out}_q8"
    nodes.append(q)
    if f"pooled:{a}" not in e.shared:
        nodes.append(helper.make_node("GatherND", [a, POOLED_INDEX], [f"{a}_pooled"], name=f"{a}_GatherPooled"))
        e.shared[f"pooled:{a}"] = f"{a}_pooled"
    nodes.append(helper.make_node("MatMul", [e.shared[f"pooled:{a}"], w], [f"{out}_pooled"], name=f"{q.name}_pooled"))
    return helper.make_node("ScatterND", [f"{out}_q8", POOLED_INDEX, f"{out}_pooled"], [out],
                            name=f"{q.name}_pooled_scatter")


def _act_nbits8(e: _Edit, n: Any, info: MatMulInfo, nodes: list[Any]) -> Any:
    from onnx import helper

    k_in, n_out, b_name, s_name = e.node_form[n.name][1]
    return helper.make_node("MatMulNBits", [n.input[0], b_name, s_name], list(n.output), name=f"{n.name}_Q8",
                            domain="com.microsoft", K=int(k_in), N=int(n_out), bits=8, block_size=e.plan.nbits_block_size,
                            accuracy_level=e.plan.nbits_accuracy_level)


def _act_row8(e: _Edit, n: Any, info: MatMulInfo, nodes: list[Any]) -> Any:
    """Per-token symmetric activation scale at run time, u8 (zero point 128) into ``MatMulIntegerToFloat``; with
    ``float_channels``, those channels bypass it through a float MatMul whose product is added."""
    from onnx import helper

    if not e.plan.float_channels.get(info.module):
        return _row8_matmul(e, n, n.input[0], nodes)
    keep = e.plan.float_channels[info.module]
    a_int, a_float = _split_channels(e, n.input[0], int(e.node_form[n.name][1][2]), keep, nodes)
    out = n.output[0]
    n.output[0] = f"{out}_int"
    nodes.append(_row8_matmul(e, n, a_int, nodes))
    nodes.append(helper.make_node("MatMul", [a_float, f"{info.weight}_r8_float_rows"], [f"{out}_float"],
                                  name=f"{n.name}_R8_float"))
    return helper.make_node("Add", [f"{out}_int", f"{out}_float"], [out], name=f"{n.name}_R8_add_float")


def _split_names(dim: int, keep: tuple[int, ...]) -> tuple[str, str]:
    """The initializers of one channel split: a [dim] 0/1 mask and the [K] int64 channel numbers."""
    import hashlib

    tag = f"{dim}_{hashlib.sha1(repr(keep).encode()).hexdigest()[:8]}"
    return f"sfr_split_mask_{tag}", f"sfr_split_idx_{tag}"


def _split_inits(e: _Edit, dim: int, keep: tuple[int, ...]) -> None:
    mask_name, idx_name = _split_names(dim, keep)
    if not any(t.name == mask_name for t in e.new_inits):
        mask = np.ones(dim, np.float32)
        mask[list(keep)] = 0.0
        e.new_inits += [e.writer.make(mask_name, mask), e.writer.make(idx_name, np.asarray(keep, np.int64))]


def _split_channels(e: _Edit, a: str, dim: int, keep: tuple[int, ...], nodes: list[Any]) -> tuple[str, str]:
    """``a`` with the channels ``keep`` zeroed, and those channels alone ([.., K]); made once per activation."""
    from onnx import helper

    key = f"split:{a}"
    if key not in e.shared:
        mask_name, idx_name = _split_names(dim, keep)
        p = f"{a}_split"
        nodes += [helper.make_node("Mul", [a, mask_name], [f"{p}_int"], name=f"{p}_Mask"),
                  helper.make_node("Gather", [a, idx_name], [f"{p}_float"], name=f"{p}_Gather", axis=-1)]
        e.shared[key] = f"{p}_int|{p}_float"
    a_int, a_float = e.shared[key].split("|")
    return a_int, a_float


def _row8_matmul(e: _Edit, n: Any, a: str, nodes: list[Any]) -> Any:
    """The per-token int8 MatMul of activation ``a`` (its quantization made once per activation)."""
    from onnx import TensorProto, helper

    if not any(t.name == "sfr_row8_one" for t in e.new_inits):
        e.new_inits += [helper.make_tensor("sfr_row8_eps", TensorProto.FLOAT, [], [1e-30]),
                        helper.make_tensor("sfr_row8_inv127", TensorProto.FLOAT, [], [1.0 / QMAX]),
                        helper.make_tensor("sfr_row8_ninv127", TensorProto.FLOAT, [], [-1.0 / QMAX]),
                        helper.make_tensor("sfr_row8_zp", TensorProto.UINT8, [], [128]),
                        helper.make_tensor("sfr_row8_one", TensorProto.FLOAT, [], [1.0]),
                        helper.make_tensor("sfr_row8_axes", TensorProto.INT64, [1], [-1])]
    key, p = f"row8:{a}", f"{a}_row8"
    if key not in e.shared:
        # scale = max|x_row| / 127 = max(max x / 127, min x / -127) (+ a floor so an all-zero row gives 0, not NaN):
        # two read-only reductions in place of Abs's written copy and a third pass, bit-identical; a blocked
        # QuantizeLinear (one block per row: scale and zero point [.., 1]) divides, rounds, shifts by 128, saturates
        # and casts in one pass (bit-identical to Div + QuantizeLinear(1, 128), and 2x as fast on a B8 x L128 x 576
        # activation)
        nodes += [helper.make_node("ReduceMax", [a, "sfr_row8_axes"], [f"{p}_max"], name=f"{p}_Max", keepdims=1),
                  helper.make_node("ReduceMin", [a, "sfr_row8_axes"], [f"{p}_min"], name=f"{p}_Min", keepdims=1),
                  helper.make_node("Mul", [f"{p}_max", "sfr_row8_inv127"], [f"{p}_s0"], name=f"{p}_S0"),
                  helper.make_node("Mul", [f"{p}_min", "sfr_row8_ninv127"], [f"{p}_s1"], name=f"{p}_S1"),
                  helper.make_node("Max", [f"{p}_s0", f"{p}_s1", "sfr_row8_eps"], [f"{p}_scale"], name=f"{p}_Scale")]
        nodes += _row_quantize(a, p, int(e.node_form[n.name][1][2]), e.opset)
        e.shared[key] = f"{p}_u8|{p}_scale"
        if e.plan.pooled_exact:
            _pooled_digit(e, a, p, nodes)
    qa, sa = e.shared[key].split("|")
    wq, ws = e.node_form[n.name][1][:2]
    out = n.output[0]
    scaled = f"{out}_r8s" if e.plan.pooled_exact else out
    nodes.append(helper.make_node("MatMulIntegerToFloat", [qa, wq, "sfr_row8_one", ws, "sfr_row8_zp"], [f"{out}_r8"],
                                  name=f"{n.name}_R8", domain="com.microsoft"))
    rescale = helper.make_node("Mul", [f"{out}_r8", sa], [scaled], name=f"{n.name}_R8_rowscale")
    if not e.plan.pooled_exact:
        return rescale
    nodes += [rescale, helper.make_node("MatMulIntegerToFloat", [f"{p}_d2_u8", wq, "sfr_row8_one", ws, "sfr_row8_zp"], [f"{out}_d2"],
                               name=f"{n.name}_R8_d2", domain="com.microsoft"),
              helper.make_node("Mul", [f"{out}_d2", f"{p}_d2_scale"], [f"{out}_d2s"], name=f"{n.name}_R8_d2_scale")]
    return helper.make_node("ScatterND", [scaled, _digit_rows(e, nodes), f"{out}_d2s"], [out], name=f"{n.name}_R8_pooled",
                            reduction="add")


def _row_quantize(a: str, p: str, k: int, opset: int) -> list[Any]:
    """``{p}_u8 = round(a / {p}_scale) + 128`` (u8, saturated), each row of ``k`` channels with its own scale."""
    from onnx import helper

    if opset < 21:  # no blocked QuantizeLinear: divide, then QuantizeLinear(1, 128)
        return [helper.make_node("Div", [a, f"{p}_scale"], [f"{p}_x"], name=f"{p}_Div"),
                helper.make_node("QuantizeLinear", [f"{p}_x", "sfr_row8_one", "sfr_row8_zp"], [f"{p}_u8"], name=f"{p}_Q")]
    return [helper.make_node("Shape", [f"{p}_scale"], [f"{p}_rows"], name=f"{p}_Rows"),
            helper.make_node("Expand", ["sfr_row8_zp", f"{p}_rows"], [f"{p}_zp"], name=f"{p}_Zp"),
            helper.make_node("QuantizeLinear", [a, f"{p}_scale", f"{p}_zp"], [f"{p}_u8"], name=f"{p}_Q", axis=-1,
                             block_size=k)]


def _pooled_index(e: _Edit, nodes: list[Any]) -> None:
    """``sfr_pooled_idx`` [B, 2]: (row, last attended position), argmax(mask * position) as the pooling takes it
    (made once per graph)."""
    from onnx import TensorProto, helper

    if POOLED_INDEX in e.shared:
        return
    e.shared[POOLED_INDEX] = POOLED_INDEX
    e.new_inits += [helper.make_tensor("sfr_pi_0", TensorProto.INT64, [], [0]),
                    helper.make_tensor("sfr_pi_1", TensorProto.INT64, [], [1]),
                    helper.make_tensor("sfr_pi_ax1", TensorProto.INT64, [1], [1])]
    nodes += [helper.make_node("Shape", ["attention_mask"], ["sfr_pi_shape"], name="sfr_pi_Shape"),
              helper.make_node("Gather", ["sfr_pi_shape", "sfr_pi_0"], ["sfr_pi_b"], name="sfr_pi_B"),
              helper.make_node("Gather", ["sfr_pi_shape", "sfr_pi_1"], ["sfr_pi_l"], name="sfr_pi_L"),
              helper.make_node("Range", ["sfr_pi_0", "sfr_pi_l", "sfr_pi_1"], ["sfr_pi_pos"], name="sfr_pi_Pos"),
              helper.make_node("Cast", ["attention_mask"], ["sfr_pi_mask"], name="sfr_pi_Cast", to=TensorProto.INT64),
              helper.make_node("Mul", ["sfr_pi_mask", "sfr_pi_pos"], ["sfr_pi_mp"], name="sfr_pi_MaskPos"),
              helper.make_node("ArgMax", ["sfr_pi_mp"], ["sfr_pi_last"], name="sfr_pi_Last", axis=1, keepdims=1),
              helper.make_node("Range", ["sfr_pi_0", "sfr_pi_b", "sfr_pi_1"], ["sfr_pi_rows"], name="sfr_pi_Rows"),
              helper.make_node("Unsqueeze", ["sfr_pi_rows", "sfr_pi_ax1"], ["sfr_pi_rows2"], name="sfr_pi_Rows2"),
              helper.make_node("Concat", ["sfr_pi_rows2", "sfr_pi_last"], [POOLED_INDEX], name="sfr_pi_Idx", axis=1)]


def _digit_rows(e: _Edit, nodes: list[Any]) -> str:
    """The rows that get the second digit: ``sfr_pooled_idx``, or with ``first_exact`` ``sfr_digit_idx`` [2B, 2]
    (the pooled rows, then each text's first attended position), with ``sfr_digit_valid`` [2B, 1] (float 0/1) that
    zeroes a first row which is also the pooled one (a one-token text), so ScatterND's add counts each row once."""
    from onnx import TensorProto, helper

    _pooled_index(e, nodes)
    if not e.plan.first_exact:
        return POOLED_INDEX
    if DIGIT_INDEX not in e.shared:
        e.shared[DIGIT_INDEX] = DIGIT_INDEX
        nodes += [helper.make_node("ArgMax", ["sfr_pi_mask"], ["sfr_di_first"], name="sfr_di_First", axis=1, keepdims=1),
                  helper.make_node("Concat", ["sfr_pi_rows2", "sfr_di_first"], ["sfr_di_fidx"], name="sfr_di_FirstIdx", axis=1),
                  helper.make_node("Concat", [POOLED_INDEX, "sfr_di_fidx"], [DIGIT_INDEX], name="sfr_di_Idx", axis=0),
                  helper.make_node("Equal", ["sfr_pi_last", "sfr_pi_last"], ["sfr_di_all"], name="sfr_di_All"),
                  helper.make_node("Equal", ["sfr_di_first", "sfr_pi_last"], ["sfr_di_same"], name="sfr_di_Same"),
                  helper.make_node("Not", ["sfr_di_same"], ["sfr_di_other"], name="sfr_di_Other"),
                  helper.make_node("Concat", ["sfr_di_all", "sfr_di_other"], ["sfr_di_valid"], name="sfr_di_Valid", axis=0),
                  helper.make_node("Cast", ["sfr_di_valid"], [DIGIT_VALID], name="sfr_di_ValidF", to=TensorProto.FLOAT)]
    return DIGIT_INDEX


def _pooled_digit(e: _Edit, a: str, p: str, nodes: list[Any]) -> None:
    """The pooled rows' second digit of activation ``a`` (quantized as ``p``): the residual ``r = x - round(x)`` of
    ``x = a / scale`` lies in [-0.5, 0.5], so ``round(254 r)`` is exact int8 (``{p}_d2_u8`` [B, K], u8 zero point 128)
    with the fixed scale 1/254 times the row's (``{p}_d2_scale`` [B, 1])."""
    from onnx import TensorProto, helper

    if "sfr_d2_step" not in e.shared:
        _pooled_index(e, nodes)
        e.new_inits += [helper.make_tensor("sfr_d2_step", TensorProto.FLOAT, [], [0.5 / QMAX])]
        e.shared["sfr_d2_step"] = "sfr_d2_step"
    d, rows = f"{p}_d2", _digit_rows(e, nodes)
    nodes += [helper.make_node("GatherND", [a, rows], [f"{d}_a"], name=f"{d}_GatherA"),
              helper.make_node("GatherND", [f"{p}_scale", rows], [f"{d}_row"], name=f"{d}_GatherScale"),
              helper.make_node("Div", [f"{d}_a", f"{d}_row"], [f"{d}_x"], name=f"{d}_Div"),
              helper.make_node("Round", [f"{d}_x"], [f"{d}_q1"], name=f"{d}_Round"),
              helper.make_node("Sub", [f"{d}_x", f"{d}_q1"], [f"{d}_r"], name=f"{d}_Residual"),
              helper.make_node("QuantizeLinear", [f"{d}_r", "sfr_d2_step", "sfr_row8_zp"], [f"{d}_u8"], name=f"{d}_Q"),
              helper.make_node("Mul", [f"{d}_row", "sfr_d2_step"], [f"{d}_step" if e.plan.first_exact else f"{d}_scale"],
                               name=f"{d}_Scale")]
    if e.plan.first_exact:
        nodes.append(helper.make_node("Mul", [f"{d}_step", DIGIT_VALID], [f"{d}_scale"], name=f"{d}_Valid"))


ACT_WRITERS: dict[str, Callable[[_Edit, Any, MatMulInfo, list[Any]], Any]] = {
    "w8a8": _act_w8a8, "nbits8": _act_nbits8, "row8": _act_row8}


def _rotate_input(e: _Edit, n: Any, info: MatMulInfo, nodes: list[Any]) -> None:
    rot = e.plan.rotations.get(info.module)
    if rot is None:
        return
    key = f"rot:{n.input[0]}"
    if key not in e.shared:
        r_nodes, r_inits, out = onnx_rotation(n.input[0], rot, f"{n.input[0]}_{rot.dim}")
        nodes += r_nodes
        e.new_inits += r_inits
        e.shared[key] = out
    n.input[0] = e.shared[key]


def _norm_updates(e: _Edit, model: Any, norm_updates: dict[str, np.ndarray]) -> None:
    for act, w in norm_updates.items():
        found = norm_mul_for(model, act, int(w.shape[0]))
        if found is None:
            raise CalibrationError(f"no RMSNorm Mul produces {act}: cannot change its scale in this graph")
        node, k = found
        new = f"{node.name}_sq_weight"
        e.new_inits.append(e.writer.make(new, np.asarray(w, np.float32)))
        node.input[k] = new


def _init_updates(e: _Edit, inits: dict[str, Callable[[], np.ndarray]]) -> None:
    for name, make in inits.items():
        e.new_inits.append(e.writer.make(f"{name}_sfr", np.asarray(make(), np.float32)))
        e.replaced[name] = f"{name}_sfr"


def _pre_matmul(e: _Edit, n: Any, edit: tuple[int, np.ndarray] | None, nodes: list[Any]) -> None:
    """Input ``k`` of node ``n`` becomes ``MatMul(input, M)`` (``edit = (k, M)``)."""
    from onnx import helper

    if edit is None:
        return
    k, m = edit
    name = f"{n.name}_in{k}_premul"
    e.new_inits.append(e.writer.make(f"{name}_m", np.asarray(m, np.float32)))
    nodes.append(helper.make_node("MatMul", [n.input[k], f"{name}_m"], [f"{name}_out"], name=name))
    n.input[k] = f"{name}_out"


def _carry_initializers(e: _Edit, model: Any, base: Path) -> list[Any]:
    """The untouched initializers that are still used, streaming external ones into the new data file."""
    from onnx.external_data_helper import uses_external_data

    used = {i for n in model.graph.node for i in n.input}
    return [e.writer.make(t.name, read_tensor(t, base)) if (uses_external_data(t) or e.writer.external) else t
            for t in model.graph.initializer if t.name not in e.replaced and t.name in used]


@dataclass(frozen=True)
class GraphEdits:
    """Float changes outside the mapped MatMuls (a residual fold, SmoothQuant): ``norms`` maps an activation tensor
    to the new RMSNorm weight producing it; ``inits`` an initializer to a function making its new value (called
    once, one tensor at a time); ``pre_matmul`` a node to (input index, M): that input becomes ``MatMul(input, M)``."""

    norms: dict[str, np.ndarray] = field(default_factory=dict)
    inits: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)
    pre_matmul: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)


def build_quantized(src_path: Path, out_path: Path, mapping: dict[str, MatMulInfo], plan: QuantPlan,
                    weight_of: Callable[[str], np.ndarray], bias_of: Callable[[str], np.ndarray | None],
                    edits: GraphEdits | None = None) -> dict[str, Any]:
    """Write ``out_path``: every mapped MatMul gets its torch weight (``weight_of(name)`` in [out, in] layout),
    quantized per ``plan``; ``edits`` changes the graph outside them."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src_path), load_external_data=False)
    total = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    e = _Edit(TensorWriter(out_path, external=total > EXTERNAL_THRESHOLD), plan,
              opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0))
    by_node = {m.node: m for m in mapping.values()}
    counts = {m: 0 for m in MODES}
    try:
        for name, info in mapping.items():
            mode = plan.modes.get(name, "float")
            if mode not in MODES:
                raise CalibrationError(f"unknown quantization mode {mode!r} for {name}")
            counts[mode] += 1
            WEIGHT_WRITERS[mode](e, info, np.asarray(weight_of(name), dtype=np.float32).T)  # [in, out]
            b = bias_of(name)
            if b is not None and info.bias is not None:
                e.new_inits.append(e.writer.make(f"{info.bias}_sfr", np.asarray(b, np.float32)))
                e.replaced[info.bias] = f"{info.bias}_sfr"
        edits = edits or GraphEdits()
        _norm_updates(e, model, edits.norms)
        _init_updates(e, edits.inits)
        nodes: list[Any] = list(e.pre_nodes)
        for n in model.graph.node:
            _pre_matmul(e, n, edits.pre_matmul.get(n.name), nodes)
            info = by_node.get(n.name)
            if info is not None:
                _rotate_input(e, n, info, nodes)
                act = ACT_WRITERS.get(plan.modes.get(info.module, "float"))
                if act is not None:
                    n = act(e, n, info, nodes)
            n.input[:] = [e.replaced.get(i, i) for i in n.input]
            nodes.append(n)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        contrib = any(m in ("nbits8", "row8") for m in plan.modes.values())
        if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        carried = _carry_initializers(e, model, Path(src_path).parent)
        del model.graph.initializer[:]
        model.graph.initializer.extend(carried + e.new_inits)
    finally:
        e.writer.close()
    if not e.writer.external and (out_path.parent / e.writer.data_name).exists():
        os.unlink(out_path.parent / e.writer.data_name)
    onnx.save(model, str(out_path))
    if not contrib:  # the checker does not know the com.microsoft contrib ops
        onnx.checker.check_model(str(out_path))
    out = {"matmuls": counts, "external_data": e.writer.external, "activation_qdq_pairs": e.qdq_pairs,
           "rotated_matmuls": sum(1 for n in mapping if n in plan.rotations)}
    if e.rounding:
        out["gptq"] = {"weights": len(e.rounding), "output_error_vs_nearest_median": float(np.median(e.rounding)),
                       "output_error_vs_nearest_max": float(np.max(e.rounding))}
    return out


def qdq_summary(path: Path) -> dict[str, Any]:
    """Structure of a Q/DQ model: which tensors are quantized, symmetry, axes (for tests and the manifest)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    out: dict[str, Any] = {"dequantize_weight": [], "quantize_activation": [], "domains": sorted({n.domain or "ai.onnx" for n in m.graph.node}),
                           "zero_points_all_zero": True, "ops": sorted({n.op_type for n in m.graph.node})}
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if zp is None or numpy_helper.to_array(zp).any() or zp.data_type != onnx.TensorProto.INT8:
            out["zero_points_all_zero"] = False
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            out["dequantize_weight"].append({"node": n.name, "axis": axis, "channels": int(np.prod(inits[n.input[1]].dims))})
        elif n.op_type == "QuantizeLinear":
            out["quantize_activation"].append({"node": n.name, "tensor": n.input[0], "per_tensor": len(inits[n.input[1]].dims) == 0})
    return out


def w8a8_mac_share(path: Path) -> dict[str, Any]:
    """From the Q/DQ graph alone: the share of linear multiply-adds (per token, ``K x N`` of each MatMul with a
    dequantized int8 weight) whose activation input is Q/DQ too (W8A8). A linear split by ``prefix_float`` or
    ``pooled_float`` counts once, by its Q/DQ part (every token but the prefix and the pooled rows)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    total = w8a8 = 0
    linears = 0
    for n in m.graph.node:
        b = prod.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in inits or n.name.endswith(("_head", "_pooled")):
            continue
        k, nn = (int(d) for d in inits[b.input[0]].dims)
        a = prod.get(n.input[0])
        linears += 1
        total += k * nn
        if a is not None and a.op_type == "DequantizeLinear" and a.input[0] not in inits:
            w8a8 += k * nn
    return {"linears": linears, "w8a8_mac_share": round(w8a8 / total, 4) if total else 0.0}
