"""Small Q/DQ graphs built with onnx.helper: one that follows TensorRT's rules, and ways to break it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N = 16, 8  # weight [K, N] of a MatMul: output channels on axis 1


def _weights(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    w = rng.normal(0, 0.05, size=(K, N)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)  # one per output channel (axis 1)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def make_qdq_model(*, weight_only: bool = False, zp_value: int = 0, zp_dtype: int = TensorProto.INT8,
                   weight_axis: int = 1, per_tensor_weight: bool = False, add_matmulnbits: bool = False,
                   qdq_on_int64: bool = False, qdq_on_mask_cast: bool = False, dq_into_add: bool = False,
                   transposed_gemm: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[B, K] -> (Q/DQ) -> MatMul(DQ(W_int8)) -> y[B, N]; with optional defects."""
    rng = np.random.default_rng(seed)
    wq, wscale = _weights(rng)
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])]
    if per_tensor_weight:
        wscale_t = numpy_helper.from_array(np.array(wscale.max(), dtype=np.float32), "w_scale")
        wzp = numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zp")
    else:
        n_ch = wq.shape[weight_axis]
        wscale_t = numpy_helper.from_array(np.resize(wscale, n_ch).astype(np.float32), "w_scale")
        wzp = numpy_helper.from_array(np.zeros(n_ch, dtype=np.int8), "w_zp")
    w_stored = wq.T.copy() if transposed_gemm else wq  # Gemm transB=1 stores [N, K]: output channels on axis 0
    inits += [numpy_helper.from_array(w_stored, "w_q"), wscale_t, wzp]
    dq_w_axis = (0 if weight_axis == 1 else 1) if transposed_gemm else weight_axis
    nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=dq_w_axis))

    a = "x"
    if not weight_only:
        zp_arr = np.array(zp_value, dtype=np.uint8 if zp_dtype == TensorProto.UINT8 else np.int8)
        inits += [numpy_helper.from_array(np.array(0.02, dtype=np.float32), "x_scale"),
                  numpy_helper.from_array(zp_arr, "x_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x")]
        a = "x_dq"
    if transposed_gemm:
        nodes.append(helper.make_node("Gemm", [a, "w"], ["y"], name="gemm", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", [a, "w"], ["y"], name="matmul"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])]

    if dq_into_add:
        inits.append(numpy_helper.from_array(np.ones((N,), dtype=np.float32), "bias"))
        inits += [numpy_helper.from_array(np.array(0.01, dtype=np.float32), "y_scale"),
                  numpy_helper.from_array(np.array(0, dtype=np.int8), "y_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["y_q"], name="q_y"),
                  helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y_dq"], name="dq_y"),
                  helper.make_node("Add", ["y_dq", "bias"], ["y_bias"], name="add_bias")]
        outputs.append(helper.make_tensor_value_info("y_bias", TensorProto.FLOAT, ["B", N]))
    if qdq_on_int64:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"]))
        inits += [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "ids_scale"),
                  numpy_helper.from_array(np.array(0, dtype=np.int8), "ids_zp")]
        # QuantizeLinear on an int64 tensor is invalid ONNX too; the checker must name it before any runtime does.
        nodes += [helper.make_node("QuantizeLinear", ["ids", "ids_scale", "ids_zp"], ["ids_q"], name="q_ids"),
                  helper.make_node("DequantizeLinear", ["ids_q", "ids_scale", "ids_zp"], ["ids_dq"], name="dq_ids")]
        outputs.append(helper.make_tensor_value_info("ids_dq", TensorProto.FLOAT, ["B", "S"]))
    if qdq_on_mask_cast:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]))
        inits += [numpy_helper.from_array(np.array(1.0 / 127, dtype=np.float32), "m_scale"),
                  numpy_helper.from_array(np.array(0, dtype=np.int8), "m_zp")]
        nodes += [helper.make_node("Cast", ["mask"], ["mask_f"], name="cast_mask", to=TensorProto.FLOAT),
                  helper.make_node("QuantizeLinear", ["mask_f", "m_scale", "m_zp"], ["mask_q"], name="q_mask"),
                  helper.make_node("DequantizeLinear", ["mask_q", "m_scale", "m_zp"], ["mask_dq"], name="dq_mask")]
        outputs.append(helper.make_tensor_value_info("mask_dq", TensorProto.FLOAT, ["B", "S"]))
    opsets = [helper.make_opsetid("", 21)]
    if add_matmulnbits:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
        inits += [numpy_helper.from_array(np.zeros((N, 1, K // 2), dtype=np.uint8), "nb_w"),
                  numpy_helper.from_array(np.ones((N,), dtype=np.float32), "nb_scale")]
        nodes.append(helper.make_node("MatMulNBits", ["x", "nb_w", "nb_scale"], ["y_nbits"], name="mm_nbits",
                                      domain="com.microsoft", K=K, N=N, bits=4, block_size=16))
        outputs.append(helper.make_tensor_value_info("y_nbits", TensorProto.FLOAT, ["B", N]))
    graph = helper.make_graph(nodes, "qdq_test", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def weight_only_int8(src: str, dst: str) -> dict[str, int]:
    """Weight-only int8 Q/DQ of an fp32 export: every MatMul whose B is a 2-D float initializer gets
    ``int8 initializer -> DequantizeLinear(axis=1, symmetric per output channel)``. The TensorRT-faithful form
    the INT8 issue produces, built here so the checker and ONNX Runtime can be tested on a real decoder graph."""
    model = onnx.load(src)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, replaced = [], 0
    done: dict[str, str] = {}
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            w_name = node.input[1]
            if w_name not in done:
                w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
                scale = np.maximum(np.abs(w).max(axis=0), 1e-8) / 127.0
                q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
                g.initializer.remove(inits[w_name])
                g.initializer.extend([numpy_helper.from_array(q, w_name + "_q"),
                                      numpy_helper.from_array(scale.astype(np.float32), w_name + "_scale"),
                                      numpy_helper.from_array(np.zeros(q.shape[1], np.int8), w_name + "_zp")])
                new_nodes.append(helper.make_node("DequantizeLinear", [w_name + "_q", w_name + "_scale", w_name + "_zp"],
                                                  [w_name + "_dq"], name=w_name + "_DequantizeLinear", axis=1))
                done[w_name] = w_name + "_dq"
                replaced += 1
            node.input[1] = done[w_name]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    onnx.save(model, dst)
    return {"weights_quantized": replaced}
