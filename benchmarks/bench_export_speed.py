"""PyTorch eager fp32 vs ONNX Runtime fp32 on a full-width 2-layer Mistral, side by side in one run.

Builds a Mistral-7B-shaped checkpoint with 2 layers (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab
32000; random fp16 weights, see bench_export_memory.make_wide_mistral), exports it to ONNX fp32 with the export stage
(the low-memory path, as ``--low-memory auto`` picks for a 7B model; validation is done here on the benchmark batch
instead), then times the package's two runtime backends (TorchRunner and OrtRunner: backbone + last-token pooling +
L2 norm) on one batch of ``--batch`` x ``--seq`` tokens, alternating the backends so that both see the same machine
load. Reports the median seconds, tokens/s and the ORT / torch ratio, and the min cosine between their outputs.

Everything runs while holding ``/tmp/sfr-heavy.lock`` (about 6 GB: the fp32 torch model and the ORT session).

    python benchmarks/bench_export_speed.py                    # batch 8 x seq 128, 2 warm-up + 7 timed runs each
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_export_memory import heavy_lock, make_wide_mistral  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for both backends")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-lock", action="store_true", help="do not take /tmp/sfr-heavy.lock (the caller holds it)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from sfr_export.models import resolve_model
    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.runtime.torch_runner import TorchRunner
    from sfr_export.stages.export import ExportConfig, run_export
    from sfr_export.vectors import row_cosine

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sfr-bench-speed-", dir=args.workdir))
    try:
        with contextlib.nullcontext() if args.no_lock else heavy_lock():
            print(f"building a {args.layers}-layer Mistral-7B-shaped checkpoint…", flush=True)
            model_dir = make_wide_mistral(work / "model", args.layers)
            model = resolve_model(str(model_dir), compute_fingerprint=False)
            print("exporting ONNX fp32…", flush=True)
            rec = run_export(work / "out", model, ExportConfig(precision="fp32", low_memory="on", validate=False))
            onnx_path = work / "out" / "onnx" / "fp32" / "model.onnx"

            # one full batch: BOS + random ids + EOS, every position attended (no padding: pure throughput)
            rng = np.random.default_rng(0)
            ids = rng.integers(3, 32000, size=(args.batch, args.seq), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 1, 2
            mask = np.ones_like(ids)

            with TorchRunner(model.local_dir, model.spec, dtype="float32") as tr, \
                    OrtRunner(onnx_path, intra_op_threads=args.threads) as orr:
                runners = {"torch eager fp32": tr, "onnxruntime fp32": orr}
                outputs = {}
                for name, r in runners.items():
                    for _ in range(args.warmup):
                        outputs[name] = r.infer(ids, mask)
                times: dict[str, list[float]] = {name: [] for name in runners}
                for i in range(args.repeats):
                    for name, r in (runners.items() if i % 2 == 0 else reversed(runners.items())):
                        t0 = time.perf_counter()
                        r.infer(ids, mask)
                        times[name].append(time.perf_counter() - t0)
                min_cos = float(row_cosine(outputs["torch eager fp32"], outputs["onnxruntime fp32"]).min())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = args.batch * args.seq
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print()
    print(f"Mistral-7B widths, {args.layers} layers, batch {args.batch} x seq {args.seq} ({tokens} tokens), "
          f"{args.threads} threads, {args.warmup} warm-up + {args.repeats} timed runs each (alternating), median")
    print("| backend | median s | min s | max s | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {med[name]:.3f} | {min(ts):.3f} | {max(ts):.3f} | {tokens / med[name]:,.0f} |")
    ratio = med["torch eager fp32"] / med["onnxruntime fp32"]
    print(f"\nORT / torch throughput ratio: {ratio:.2f}x   (min cosine torch vs ORT on this batch: {min_cos:.6f}; "
          f"export path low_memory={rec.figures.get('low_memory')})")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "median": med, "tokens": tokens, "ratio_ort_over_torch": ratio,
                                         "min_cosine": min_cos, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()
