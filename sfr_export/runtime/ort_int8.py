"""Exact integer GEMMs on every x86 CPU.

ONNX Runtime multiplies u8 activations by s8 weights (``MatMulIntegerToFloat``, ``MatMulInteger``: the ``int8-cpu``
form) with VNNI's ``VPDPBUSD`` where the CPU has it, which accumulates in int32. Without VNNI (AVX2, AVX-512 without
VNNI) it uses ``VPMADDUBSW``, which adds pairs of products in int16 and saturates: with the activations' zero point
128 a pair reaches 2 x 255 x 127 > 32767, and some outputs come out wrong (an AVX2 EPYC, [1024, 576] x [576, 1536]:
max error 6.0). ORT's u8 x u8 kernel widens to int16 before it multiplies and is exact (there, 1.25x the u8 x s8
time, still 1.3x faster than fp32). So on such a CPU the runner serves a copy of the model whose int8 weights are u8
(w + 128) with weight zero point 128: the same products, exact.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError

log = logging.getLogger(__name__)

INTEGER_MATMULS = {"MatMulIntegerToFloat": 5, "MatMulInteger": 3}  # op -> index of its B zero point input
X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def u8s8_saturates(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True where ORT's u8 x s8 GEMM may saturate: an x86 CPU not known to have AVX-512 VNNI or AVX-VNNI."""
    if platform.machine().lower() not in X86:
        return False  # Arm's dot-product and widening kernels accumulate in 32 bits
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        return True  # flags unknown (not Linux): take the exact kernel
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


# Q/DQ graphs (the ``int8`` form): ORT fuses QuantizeLinear/DequantizeLinear around a MatMul into the same u8 x s8
# integer kernels, so on such a CPU they are run as written instead: DequantizeLinear, then a float MatMul (exact
# Q/DQ arithmetic, float speed; the form is TensorRT's, ORT runs it to measure it)
EXACT_QDQ_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def exact_session_config(config: dict[str, str], saturates: bool) -> dict[str, str]:
    """``config`` plus, where the u8 x s8 GEMM saturates, the entry that keeps ORT from fusing Q/DQ into it."""
    return {**EXACT_QDQ_SESSION_CONFIG, **config} if saturates else dict(config)


def _s8_weights(graph: Any) -> dict[str, list[Any]]:
    """The int8 initializers read as B by an integer MatMul, with the nodes that read them."""
    from onnx import TensorProto

    s8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        if n.op_type in INTEGER_MATMULS and len(n.input) > 1 and n.input[1] in s8:
            out.setdefault(n.input[1], []).append(n)
    return out


def as_u8_weights(model: Any) -> int:
    """Rewrite ``model`` in place: every int8 B of an integer MatMul becomes u8 (+128) with zero point 128 (an int8
    B zero point z becomes z + 128). Returns the number of nodes rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    weights = _s8_weights(graph)
    if not weights:
        return 0
    inits = {t.name: t for t in graph.initializer}
    zp_name = "sfr_u8_weight_zp"
    graph.initializer.append(helper.make_tensor(zp_name, TensorProto.UINT8, [], [128]))
    converted: set[str] = set()
    for name, nodes in weights.items():
        _to_u8(inits[name], numpy_helper)
        for n in nodes:
            k = INTEGER_MATMULS[n.op_type]
            while len(n.input) <= k:
                n.input.append("")
            if n.input[k] and n.input[k] in inits and n.input[k] not in converted:
                _to_u8(inits[n.input[k]], numpy_helper)
                converted.add(n.input[k])
            elif not n.input[k]:
                n.input[k] = zp_name
    return sum(len(v) for v in weights.values())


def _to_u8(t: Any, numpy_helper: Any) -> None:
    a = numpy_helper.to_array(t).astype(np.int16) + 128
    t.CopyFrom(numpy_helper.from_array(a.astype(np.uint8), t.name))


@contextlib.contextmanager
def exact_integer_form(onnx_path: Path, *, saturates: bool | None = None) -> Iterator[Path]:
    """The path to load: ``onnx_path`` itself, or where the CPU's u8 x s8 GEMM saturates and the model has one, a
    temporary u8-weight copy (removed on exit; load it inside the ``with``)."""
    if not (u8s8_saturates() if saturates is None else saturates) or not _has_integer_matmul(onnx_path):
        yield onnx_path
        return
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailableError(f"{onnx_path.name} has int8 MatMuls, and this CPU has no VNNI, where ONNX "
                                      "Runtime's u8 x s8 GEMM saturates: pip install onnx to serve it exactly "
                                      "(u8 weights), or serve an fp32/fp16 variant") from exc
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf's DecodeError, onnx's external-data errors: a damaged file
        raise ArtifactError(f"cannot load {onnx_path}: corrupt or truncated file? ({type(exc).__name__})") from exc
    n = as_u8_weights(model)
    with tempfile.TemporaryDirectory(prefix="sfr-u8-", ignore_cleanup_errors=True) as tmp:
        dst = Path(tmp) / onnx_path.name
        onnx.save(model, str(dst), save_as_external_data=True, location=f"{onnx_path.name}.data")
        log.info("%s: this CPU has no VNNI, so %d integer MatMuls run with u8 weights (exact; u8 x s8 saturates)",
                 onnx_path.name, n)
        yield dst


def _has_integer_matmul(onnx_path: Path) -> bool:
    """Whether the graph names an integer MatMul op, by a scan of the file's bytes (no onnx needed: fp32/fp16 serving
    stays without it). A weight that happened to hold the name would only cost an exact copy."""
    import mmap

    if onnx_path.stat().st_size == 0:
        return False  # ONNX Runtime says what is wrong with an empty file
    with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(b"MatMulInteger") >= 0
