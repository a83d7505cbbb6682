"""Time an artifact's ONNX forms on another machine without their weights.

A real model's weights cannot travel to a lent machine (64 MiB a call), but the speed of a graph does not depend on
its weights' values: integer GEMMs, dynamic quantization and float ops do the same work for any value. So ``pack``
writes each form's graph with its large initializers emptied (name, type and shape kept; every node, small constant,
index and mask verbatim), and ``time`` refills them with seeded random values of the same type and shape, builds the
torch fp32 eager reference from the backbone's config (random init, the same module code), and times them side by
side as ``bench_int8.py smollm2`` does: one thread, alternating, medians, against the machine's int8 GEMM peak.

Fidelity is not measured here (the values are random): it comes from ``bench_int8.py smollm2`` on the real weights.

    python benchmarks/bench_int8_shapes.py pack --artifact DIR [--levers folded,rotated,row8] --pack PACK_DIR
    python benchmarks/bench_int8_shapes.py time PACK_DIR --out RESULT.json [--reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STUB = "bench_int8_shapes: weights emptied, refilled with random values by `time`"
STUB_MIN_BYTES = 4096  # initializers at least this large are weights, scales or tables; smaller ones stay verbatim
STUB_TYPES = {1: np.float32, 10: np.float16, 3: np.int8, 2: np.uint8}  # onnx TensorProto data types


def _stub_graph(src: Path, dst: Path) -> int:
    """``src`` with every large float/int8/uint8 initializer emptied (marked ``STUB``); returns the bytes left out."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    left_out = 0
    for t in model.graph.initializer:
        if t.data_type not in STUB_TYPES:
            continue
        arr = numpy_helper.to_array(t)
        if arr.nbytes < STUB_MIN_BYTES:
            continue
        left_out += arr.nbytes
        empty = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims, doc_string=STUB)
        t.CopyFrom(empty)
    onnx.save(model, str(dst))
    return left_out


def _refill(src: Path, dst: Path, seed: int) -> None:
    """The packed graph with its emptied initializers filled with seeded random values of their type and shape."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for t in model.graph.initializer:
        if t.doc_string != STUB:
            continue
        dtype, shape = STUB_TYPES[t.data_type], tuple(t.dims)
        if dtype in (np.float32, np.float16):
            arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def cmd_pack(args) -> dict:
    """Write PACK/formN.onnx (weightless), PACK/config.json (the backbone's) and PACK/forms.json."""
    import shutil

    from bench_int8 import smol_variants

    from sfr_export.artifact import Manifest, load_spec

    root, pack = Path(args.artifact), Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    man = Manifest.load(root)
    shutil.copyfile(Path(man.model["local_dir"]) / "config.json", pack / "config.json")
    forms = []
    for i, (label, (cfg, path)) in enumerate(smol_variants(root, args).items()):
        left_out = _stub_graph(path, pack / f"form{i}.onnx")
        forms.append({"label": label, "file": f"form{i}.onnx", "session_config": cfg, "weight_bytes_left_out": left_out})
        print(f"packed {label}: {(pack / f'form{i}.onnx').stat().st_size / 2**20:.1f} MiB, {left_out / 2**20:.0f} MiB left out", flush=True)
    meta = {"artifact": str(root), "model": man.model.get("id"), "spec": load_spec(root).to_dict(), "forms": forms}
    (pack / "forms.json").write_text(json.dumps(meta, indent=2))
    return meta


def torch_reference(config: Path) -> Any:
    """The backbone's architecture from its config.json, random init, fp32, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(config.parent))
    torch.manual_seed(0)
    return AutoModel.from_config(cfg, dtype=torch.float32).eval()


def machine() -> dict[str, Any]:
    """CPU model and the integer-dot-product flags that decide ORT's int8 kernels; library versions."""
    import onnxruntime as ort
    import torch

    info = Path("/proc/cpuinfo").read_text(errors="replace") if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu": name, "int8_flags": sorted(f for f in flags if "vnni" in f or f.startswith("amx") or f == "avx512f"),
            "onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version()}


def cmd_time(args) -> dict:
    """Refill every packed form, then time torch fp32 eager and each form side by side (one thread, medians)."""
    import torch
    from bench_int8 import _smol_linear_macs_per_token, gemm_peaks, time_alternating

    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.runtime.torch_runner import TorchRunner
    from sfr_export.spec import ModelSpec

    pack = Path(args.pack)
    meta = json.loads((pack / "forms.json").read_text())
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"machine": machine(), "threads": args.threads, "model": meta["model"],
                           "weights": "random values, the packed graphs' own shapes and types (speed only)"}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        spec = ModelSpec.from_dict(meta["spec"])
        runner = TorchRunner(pack, spec, model=torch_reference(pack / "config.json"))
        fns = {"torch fp32 eager": stack.enter_context(runner).infer}
        for f in meta["forms"]:
            dst = Path(tmp) / f["file"]
            _refill(pack / f["file"], dst, seed=0)
            fns[f["label"]] = stack.enter_context(OrtRunner(dst, intra_op_threads=args.threads,
                                                            session_config=f["session_config"])).infer
        t = time.perf_counter()
        res["speed"] = time_alternating(fns, {(8, 128): args.reps, (1, 32): 6 * args.reps})
        res["timing_seconds"] = time.perf_counter() - t
    Path(args.out).write_text(json.dumps(res, indent=2))  # kept if the peak measurement below fails
    res["gemm_peaks"] = gemm_peaks(threads=args.threads)
    cfg = json.loads((pack / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    h = cfg["hidden_size"]
    macs = _smol_linear_macs_per_token(h, cfg["intermediate_size"], h * kv_heads // heads, cfg["num_hidden_layers"])
    peak = res["gemm_peaks"]["int8_gops"]
    for v in res["speed"]["B8xL128"].values():  # linear MACs only (attention excluded)
        v["fraction_of_int8_peak"] = 2 * macs * v["tokens_per_s"] / 1e9 / peak
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack", help="write the artifact's forms without their weights")
    p.add_argument("--artifact", required=True, help="a calibrated output dir (with its fp32 export)")
    p.add_argument("--pack", required=True, help="the folder to write")
    p.add_argument("--levers", nargs="?", const="", default=None, help="also bench_int8's lever forms (label words)")
    p.add_argument("--no-ort-fp32", action="store_true")
    p.add_argument("--no-offered", action="store_true")
    p.add_argument("--out", default="/tmp/sfr-bench-int8", help="where the lever forms are built")
    t = sub.add_parser("time", help="refill and time a pack, side by side")
    t.add_argument("pack")
    t.add_argument("--out", required=True, help="result JSON")
    t.add_argument("--reps", type=int, default=5, help="timed runs at B8xL128 (B1xL32: 6x as many)")
    t.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = cmd_pack(args) if args.what == "pack" else cmd_time(args)
    if args.what == "time":
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2), flush=True)


if __name__ == "__main__":
    main()
