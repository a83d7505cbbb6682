"""Where an ONNX form spends its time: ONNX Runtime's own profiler, summed by op type (and by node-name group).

    python benchmarks/profile_ort_ops.py MODEL.onnx [--batch 8 --length 128 --threads 1 --runs 3] [--session-config K=V ...]

Prints, per op type, the share of the kernel time and ms per run (the median run of ``--runs`` profiled runs after
one warm-up), so a form's float parts (attention, norms, rotations, quantization) can be weighed against its GEMMs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile(model: Path, batch: int, length: int, threads: int, runs: int, config: dict[str, str]) -> dict:
    import onnxruntime as ort

    from sfr_export.runtime.ort_int8 import exact_integer_form, exact_session_config, u8s8_saturates

    saturates = u8s8_saturates()  # the runtime's own choices on this CPU (OrtRunner's)
    with tempfile.TemporaryDirectory() as tmp, exact_integer_form(model, saturates=saturates) as path:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        for k, v in exact_session_config(config, saturates).items():
            so.add_session_config_entry(k, str(v))
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ids = np.random.default_rng(0).integers(100, 30000, size=(batch, length)).astype(np.int64)
        feed = {i.name: (ids if "ids" in i.name else np.ones_like(ids)) for i in sess.get_inputs()}
        for _ in range(runs + 1):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_run: list[dict[str, float]] = [defaultdict(float)]  # a run's node events come before its model_run event
    groups: list[dict[str, float]] = [defaultdict(float)]
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            per_run.append(defaultdict(float))
            groups.append(defaultdict(float))
        elif e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_run[-1][e["args"]["op_name"]] += e["dur"] / 1000.0
            group = re.sub(r"\d+", "#", e["name"][: -len("_kernel_time")])  # the same node in every layer
            groups[-1][f"{e['args']['op_name']} {group}"] += e["dur"] / 1000.0
    per_run, groups = per_run[:-1], groups[:-1]  # the last bucket holds no run
    first = 1 if len(per_run) > 1 else 0  # the first run is the warm-up
    total = [sum(r.values()) for r in per_run[first:]]
    i = first + int(np.argsort(total)[len(total) // 2])
    mid, t = per_run[i], total[i - first]
    return {"model": str(model), "shape": [batch, length], "threads": threads, "kernel_ms": t,
            "ops": {k: {"ms": v, "share": v / t} for k, v in sorted(mid.items(), key=lambda kv: -kv[1])},
            "nodes": {k: {"ms": v, "share": v / t} for k, v in sorted(groups[i].items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=0, help="also the N costliest node groups (layer numbers merged)")
    ap.add_argument("--session-config", nargs="*", default=[], help="ORT session config entries, KEY=VALUE")
    args = ap.parse_args()
    config = dict(re.split("=", kv, maxsplit=1) for kv in args.session_config)
    res = profile(Path(args.model), args.batch, args.length, args.threads, args.runs, config)
    print(f"{res['model']}  B{args.batch}xL{args.length}, {args.threads} thread(s): {res['kernel_ms']:.1f} ms of kernels")
    for op, v in res["ops"].items():
        print(f"  {op:32s} {v['ms']:9.2f} ms  {v['share']:6.1%}")
    for name, v in list(res["nodes"].items())[: args.nodes]:
        print(f"  {name[:90]:90s} {v['ms']:9.2f} ms  {v['share']:6.1%}")


if __name__ == "__main__":
    main()
