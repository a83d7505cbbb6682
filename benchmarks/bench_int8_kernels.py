"""Kernel-level ceilings of the CPU int8 forms: one linear of real SmolLM2's shapes, each form written by the
calibrate stage's own graph writer (``qdq.build_quantized``) and loaded as the runtime loads it (``exact_integer_form``:
u8 weights where ORT's u8 x s8 GEMM saturates), timed against the fp32 MatMul side by side in one run (one thread,
the forms alternated, medians). Whole-model speedups cannot beat these ratios; the GEMM peaks (``bench_int8``) bound
them in turn.

    OMP_NUM_THREADS=1 python benchmarks/bench_int8_kernels.py [--reps 15] [--out /tmp/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import gemm_peaks  # noqa: E402

from sfr_export.quant.qdq import MatMulInfo, QuantPlan, build_quantized  # noqa: E402
from sfr_export.quant.rotation import make_rotation  # noqa: E402
from sfr_export.runtime.ort_int8 import exact_integer_form  # noqa: E402

SHAPES = {"q_proj/o_proj 576->576": (576, 576), "gate/up_proj 576->1536": (576, 1536), "down_proj 1536->576": (1536, 576)}
BATCHES = {"B8xL128": (8, 128), "B1xL32": (1, 32)}
FORMS = {"fp32": ("float", 32, False), "row8": ("row8", 32, False), "row8 rotated": ("row8", 32, True),
         "nbits8 b32": ("nbits8", 32, False), "nbits8 b64": ("nbits8", 64, False), "nbits8 b128": ("nbits8", 128, False)}


def _fp32_linear(path: Path, k: int, n: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((k, n)) * k ** -0.5).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "l", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", n])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _session(src: Path, dst: Path, k: int, form: tuple[str, int, bool]) -> Any:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    mode, block, rotated = form
    info = MatMulInfo(module="lin", node="mm", weight="w", activation="x", bias_add=None, bias=None)
    rots = {"lin": make_rotation(k, 0)} if rotated else {}
    w = numpy_helper.to_array(next(t for t in onnx.load(str(src)).graph.initializer if t.name == "w")).T
    build_quantized(src, dst, {"lin": info}, QuantPlan({"lin": mode}, {}, nbits_block_size=block, rotations=rots),
                    weight_of=lambda _n: rots["lin"].apply(w) if rotated else w, bias_of=lambda _n: None)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    with exact_integer_form(dst) as path:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _median_ms(sess: Any, x: np.ndarray, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def run(reps: int) -> dict[str, Any]:
    res: dict[str, Any] = {"gemm_peaks_1thread": gemm_peaks(threads=1), "ratio_vs_fp32_matmul": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name, (k, n) in SHAPES.items():
            src = Path(tmp) / f"{k}x{n}.onnx"
            _fp32_linear(src, k, n)
            sessions = {f: _session(src, Path(tmp) / f"{k}x{n}_{i}.onnx", k, form) for i, (f, form) in enumerate(FORMS.items())}
            for batch_name, (b, seq) in BATCHES.items():
                x = np.random.default_rng(1).standard_normal((b, seq, k)).astype(np.float32)
                times: dict[str, list[float]] = {f: [] for f in sessions}
                for s in sessions.values():
                    s.run(None, {"x": x})
                for _ in range(3):  # alternate the forms
                    for f, s in sessions.items():
                        times[f].append(_median_ms(s, x, reps))
                fp32 = float(np.median(times["fp32"]))
                row = {f: round(fp32 / float(np.median(t)), 3) for f, t in times.items()}
                res["ratio_vs_fp32_matmul"][f"{shape_name} {batch_name}"] = row
                print(json.dumps({f"{shape_name} {batch_name}": row}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = run(args.reps)
    print(json.dumps({"gemm_peaks_1thread": res["gemm_peaks_1thread"]}))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
