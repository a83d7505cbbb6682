"""Does an Embedder's memory stay flat over many calls? RSS sampled every N calls over 10k ``encode`` calls.

    python benchmarks/bench_memory_flat.py out/tiny --calls 10000

Calls vary batch size (1..16) and text length so ONNX Runtime sees many shapes. The first ``--warmup`` calls are
not counted (arena and allocator warm-up). Reports RSS after warm-up, at the end, the max, the slope of a
least-squares line through the samples (MB per 1k calls), and the growth over the second half of the run: bounded
allocator high-water marks (Hugging Face tokenizers' rayon threads each grow a glibc arena) show as early growth
with a flat second half; a leak shows as a second half that keeps growing. Run it with TOKENIZERS_PARALLELISM=false
(what ``sfr-export serve`` sets) to see the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--sample-every", type=int, default=250)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--variant", default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import numpy as np
    import psutil

    from sfr_export import Embedder

    emb = Embedder.from_artifact(a.artifact, backend=a.backend, variant=a.variant)
    proc = psutil.Process()
    rng = random.Random(0)
    words = "alpha beta gamma delta river stone cloud engine violet quantum harbor lantern".split()

    def call(i: int) -> None:
        n = rng.randint(1, 16)
        emb.encode([f"{i}-{k} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for k in range(n)])

    for i in range(a.warmup):
        call(i)
    rss0 = proc.memory_info().rss / 2**20
    samples: list[tuple[int, float]] = [(0, rss0)]
    t0 = time.perf_counter()
    for i in range(1, a.calls + 1):
        call(i)
        if i % a.sample_every == 0:
            samples.append((i, proc.memory_info().rss / 2**20))
    dt = time.perf_counter() - t0
    xs = np.array([s[0] for s in samples], dtype=float)
    ys = np.array([s[1] for s in samples])
    slope = float(np.polyfit(xs, ys, 1)[0]) * 1000 if len(samples) > 2 else 0.0
    half = ys[len(ys) // 2]
    res = {"artifact": str(a.artifact), "backend": emb.info.get("backend"), "variant": emb.info.get("variant"),
           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
           "second_half_growth_mb": float(ys[-1] - half),
           "calls": a.calls, "seconds": dt, "rss_after_warmup_mb": rss0, "rss_end_mb": float(ys[-1]),
           "rss_max_mb": float(ys.max()), "growth_mb": float(ys[-1] - rss0), "slope_mb_per_1k_calls": slope,
           "samples": samples}
    print(f"{a.calls} calls in {dt:.1f}s on {res['backend']} {res['variant'] or ''}: RSS {rss0:.1f} MB after warm-up -> "
          f"{res['rss_end_mb']:.1f} MB at the end (max {res['rss_max_mb']:.1f}); growth {res['growth_mb']:+.1f} MB, "
          f"slope {slope:+.3f} MB per 1k calls; second half {res['second_half_growth_mb']:+.1f} MB "
          f"(TOKENIZERS_PARALLELISM={res['tokenizers_parallelism']})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
