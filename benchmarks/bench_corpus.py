"""``embed-corpus`` benchmark: engine overhead against a bare ``Embedder.encode`` loop, Ray with 2 workers, peak RSS
flat in corpus size, and a paper estimate of 10M x 256-token passages for SFR-Embedding-Mistral int8.

One run prints every figure; ratios are measured side by side (alternating, medians), threads pinned.

    python benchmarks/bench_corpus.py [--artifact DIR] [--rows 20000] [--rounds 3] [--rss-rows 200000]
        [--sections overhead,ray,rss,paper]

Without --artifact, demo:tiny-mistral is exported into the work dir. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "corpus"))


@dataclass
class Timing:
    seconds: float
    rows: int
    tokens: int
    first_unit_s: float = 0.0  # time to the first finished unit (start-up: load, Ray actors)
    steady_rows_per_s: float = 0.0  # rows/s after the first unit

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# ---- inputs --------------------------------------------------------------------------------------------------
def make_input(path: Path, n: int, short: bool) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if short:
        texts = [f"passage {i}: a short text about topic {i % 97} for the memory test" for i in range(n)]
    else:
        from shipped import shipped_texts

        base = shipped_texts(2000)
        texts = [base[i % len(base)] for i in range(n)]
    pq.write_table(pa.table({"id": [f"d{i:08d}" for i in range(n)], "text": texts}), path)
    return path


def ensure_artifact(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    art = work / "tiny-mistral"
    if not (art / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "sfr_export.cli", "-q", "export", "--model", "demo:tiny-mistral",
                        "--output", str(art)], check=True, stdout=subprocess.DEVNULL)
    return art


# ---- runs ----------------------------------------------------------------------------------------------------
def run_bare(art: Path, src: Path, threads: int, chunk: int) -> Timing:
    """What a user writes without embed-corpus: load, then Embedder.encode over chunks of the same rows."""
    import pyarrow.parquet as pq

    from sfr_export.runtime import Embedder

    texts = pq.read_table(src, columns=["text"]).column("text").to_pylist()
    t0 = time.perf_counter()
    tokens = 0
    with Embedder.from_artifact(art, variant="fp32", intra_op_threads=threads, batch_size=64,
                                max_batch_tokens=16384) as emb:
        first = 0.0
        for k in range(0, len(texts), chunk):
            enc = emb.tokenize(texts[k:k + chunk], side="document")
            tokens += sum(len(s) for s in enc.ids)
            emb.encode_ids(enc.ids, check=False)
            first = first or time.perf_counter() - t0
    wall = time.perf_counter() - t0
    steady = (len(texts) - chunk) / (wall - first) if len(texts) > chunk else float("nan")
    return Timing(wall, len(texts), tokens, first, steady)


def run_engine(art: Path, src: Path, out: Path, engine: str, threads: int, chunk: int, workers: int | None = None) -> Timing:
    from sfr_export.corpus import CorpusConfig, EngineKind, embed_corpus

    shutil.rmtree(out, ignore_errors=True)
    marks: list[tuple[float, int]] = []
    cfg = CorpusConfig(artifact=art, input=str(src), output=out, chunk_rows=chunk, engine=EngineKind(engine),
                       threads_per_worker=threads, workers=workers)
    s = embed_corpus(cfg, on_progress=lambda p: marks.append((p.elapsed, p.rows_done)))
    (t1, r1), (t2, r2) = marks[0], marks[-1]
    steady = (r2 - r1) / (t2 - t1) if len(marks) > 1 else float("nan")
    return Timing(s.wall_seconds, s.rows_embedded, s.tokens, t1, steady)


def alternate(runs: dict[str, callable], rounds: int) -> dict[str, Timing]:
    """Run each candidate ``rounds`` times, rotating the order; keep the median-time run of each."""
    got: dict[str, list[Timing]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got[name].append(runs[name]())
            print(f"  round {r + 1} {name}: {got[name][-1].seconds:.2f}s", flush=True)
    return {k: sorted(v, key=lambda t: t.seconds)[len(v) // 2] for k, v in got.items()}


def show(results: dict[str, Timing], base: str) -> None:
    b = results[base]
    print(f"  {'run':<28}{'wall s':>9}{'rows/s':>10}{'tokens/s':>11}{'speed vs base':>15}{'start s':>9}"
          f"{'steady rows/s':>15}")
    for name, t in results.items():
        print(f"  {name:<28}{t.seconds:>9.2f}{t.rows_per_s:>10,.0f}{t.tokens_per_s:>11,.0f}"
              f"{b.seconds / t.seconds:>15.3f}{t.first_unit_s:>9.2f}{t.steady_rows_per_s:>15,.0f}")
    for name, t in results.items():
        if name != base:
            print(f"  overhead of {name} vs {base}: {100 * (t.seconds / b.seconds - 1):+.1f}% wall, "
                  f"steady-state {100 * (b.steady_rows_per_s / t.steady_rows_per_s - 1):+.1f}%")


def warm_up(art: Path, work: Path) -> None:
    """Import and load everything once, untimed, so that neither side of a ratio pays first-use costs."""
    src = make_input(work / "warm.parquet", 300, short=False)
    run_bare(art, src, 1, 100)
    run_engine(art, src, work / "o-warm", "local", 1, 100)


def section_overhead(art: Path, work: Path, rows: int, rounds: int, chunk: int) -> None:
    print(f"\n== local engine vs bare Embedder.encode loop: {rows} shipped-text rows, 1 thread, chunk {chunk}")
    src = make_input(work / "overhead.parquet", rows, short=False)
    warm_up(art, work)
    res = alternate({"bare encode loop (1 thr)": lambda: run_bare(art, src, 1, chunk),
                     "embed-corpus local (1 thr)": lambda: run_engine(art, src, work / "o-local", "local", 1, chunk)},
                    rounds)
    show(res, "bare encode loop (1 thr)")


def section_ray(art: Path, work: Path, rows: int, rounds: int, chunk: int, two_thread_base: bool = True) -> None:
    import ray

    print(f"\n== Ray engine, 2 workers x 1 thread, vs bare loops: {rows} rows, chunk {chunk}")
    src = make_input(work / "ray.parquet", rows, short=False)
    warm_up(art, work)
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"  ray.init (local, 2 CPUs): {time.perf_counter() - t0:.2f}s (not in the figures below: a cluster is up)")
    try:
        runs = {"bare encode loop (2 thr)": lambda: run_bare(art, src, 2, chunk),
                "bare encode loop (1 thr)": lambda: run_bare(art, src, 1, chunk),
                "embed-corpus ray 2x1": lambda: run_engine(art, src, work / "o-ray", "ray", 1, chunk, 2)}
        if not two_thread_base:
            del runs["bare encode loop (2 thr)"]
        res = alternate(runs, rounds)
    finally:
        ray.shutdown()
    show(res, "bare encode loop (1 thr)")


# ---- peak RSS ------------------------------------------------------------------------------------------------
def child_rss(art: str, src: str, out: str, chunk: int) -> None:
    """Child process: embed ``src`` with the local engine, print peak RSS (MB) and rows as JSON."""
    import resource

    t = run_engine(Path(art), Path(src), Path(out), "local", 1, chunk)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "rows": t.rows, "seconds": t.seconds, "rows_per_s": t.rows_per_s}))


def section_rss(art: Path, work: Path, big: int, small: int, chunk: int) -> None:
    print(f"\n== peak RSS of the local engine (fresh process each, short texts, chunk {chunk})")
    for n in (small, big):
        src = make_input(work / f"rss-{n}.parquet", n, short=True)
        r = subprocess.run([sys.executable, __file__, "--child-rss", str(art), str(src), str(work / f"o-rss-{n}"),
                            str(chunk)], check=True, capture_output=True, text=True)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {n:>8,} rows: peak RSS {got['peak_rss_mb']:,.0f} MB, {got['seconds']:.1f}s, "
              f"{got['rows_per_s']:,.0f} rows/s, input {src.stat().st_size / 1e6:.1f} MB", flush=True)


# ---- paper estimate ------------------------------------------------------------------------------------------
# SFR-Embedding-Mistral = Mistral-7B: 32 layers, hidden 4096, 32 heads, 8 KV heads (head 128), MLP 14336. The
# matmuls of one layer carry ~98% of its FLOPs at 256 tokens; we time exactly those shapes and add the rest as an
# allowance. Parameters (no LM head in an embedder): 32 * 218.1M + 131M embeddings.
LAYERS, HIDDEN, KV, MLP = 32, 4096, 1024, 14336
LAYER_SHAPES = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, KV), "v": (HIDDEN, KV), "o": (HIDDEN, HIDDEN),
                "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}
FLOPS_PER_TOKEN = 2 * LAYERS * sum(k * n for k, n in LAYER_SHAPES.values()) + LAYERS * 4 * 256 * HIDDEN
NON_MATMUL_ALLOWANCE = 1.10  # attention softmax/AV, norms, rotary, SiLU, tokenization: +10% (assumed)


def layer_model(path: Path, quantize: bool) -> Path:
    """One Mistral layer's seven matmuls as an ONNX graph (random weights); int8 via ORT dynamic quantization."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((k, n), dtype=np.float32) * 0.02), f"W{name}")
             for name, (k, n) in LAYER_SHAPES.items()]
    mm = lambda a, w, o: helper.make_node("MatMul", [a, w], [o])  # noqa: E731
    nodes = [mm("x", "Wq", "q"), mm("x", "Wk", "k"), mm("x", "Wv", "v"), mm("q", "Wo", "o"), mm("x", "Wgate", "g"),
             mm("x", "Wup", "u"), helper.make_node("Mul", ["g", "u"], ["h"]), mm("h", "Wdown", "d"),
             helper.make_node("Add", ["o", "d"], ["y"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["M", None]) for n in ("y", "k", "v")]
    graph = helper.make_graph(nodes, "mistral_layer_matmuls",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])], outs, inits)
    fp32 = path.with_suffix(".fp32.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    if not quantize:
        return fp32
    from onnxruntime.quantization import QuantType, quantize_dynamic

    q = path.with_suffix(".int8.onnx")
    quantize_dynamic(fp32, q, weight_type=QuantType.QInt8, per_channel=True)
    return q


def time_layer(model: Path, tokens: int, calls: int) -> float:
    """Median seconds per token of one layer's matmuls on one thread."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((tokens, HIDDEN), dtype=np.float32)
    sess.run(None, {"x": x})  # warm-up
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / tokens


def section_paper(work: Path, tokens: int, calls: int) -> None:
    print(f"\n== paper estimate: 10M passages x 256 tokens, SFR-Embedding-Mistral (7.1B) "
          f"({FLOPS_PER_TOKEN / 1e9:.1f} GFLOP/token)")
    per_tok = {}
    for name, quant in (("fp32", False), ("int8 (ORT dynamic, per-channel)", True)):
        model = layer_model(work / "layer", quant)
        per_tok[name] = time_layer(model, tokens, calls)
        model.unlink()
        print(f"  measured, one full-width Mistral layer's matmuls, {tokens} tokens/call, 1 thread, {name}: "
              f"{per_tok[name] * 1e6:,.1f} us/token/layer", flush=True)
    total_tokens = 10_000_000 * 256
    int8_s = per_tok["int8 (ORT dynamic, per-channel)"] * LAYERS * NON_MATMUL_ALLOWANCE  # s/token/core
    print(f"  => SFR int8 on one core of this box: {1 / int8_s:,.1f} tokens/s "
          f"({FLOPS_PER_TOKEN / int8_s / 1e9:,.1f} GOP/s effective); fp32: "
          f"{1 / (per_tok['fp32'] * LAYERS * NON_MATMUL_ALLOWANCE):,.1f} tokens/s")
    cores, eff = 32, 0.7
    node_tps = cores * eff / int8_s
    print(f"  CPU nodes (assumed: {cores} cores/node like this box's cores, {eff:.0%} multi-core efficiency, "
          f"one Ray actor per node): {node_tps:,.0f} tokens/s/node")
    for n in (1, 8, 64, 256):
        print(f"    {n:>4} nodes: {total_tokens / (n * node_tps) / 3600:>10,.1f} h")
    peak, mfu = 1979e12, 0.35  # H100 SXM dense int8 TOPS (NVIDIA datasheet); utilisation assumed, not measured
    gpu_tps = peak * mfu / FLOPS_PER_TOKEN
    print(f"  GPUs (NOT measured here, no GPU: H100 SXM int8 dense {peak / 1e12:,.0f} TOPS x assumed {mfu:.0%} "
          f"utilisation, TensorRT int8, one actor per GPU): {gpu_tps:,.0f} tokens/s/GPU")
    for n in (1, 8, 64):
        print(f"    {n:>4} GPUs: {total_tokens / (n * gpu_tps) / 3600:>10,.2f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact")
    ap.add_argument("--work", default="/tmp/bench_corpus")
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--ray-rows", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--ray-chunk", type=int, default=2048)
    ap.add_argument("--rss-rows", type=int, default=200_000)
    ap.add_argument("--rss-small", type=int, default=10_000)
    ap.add_argument("--paper-tokens", type=int, default=512)
    ap.add_argument("--paper-calls", type=int, default=3)
    ap.add_argument("--sections", default="overhead,ray,rss,paper")
    ap.add_argument("--no-ray-two-thread-base", action="store_true", help="Ray section: skip the 2-thread bare loop.")
    ap.add_argument("--child-rss", nargs=4, metavar=("ART", "SRC", "OUT", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_rss:
        return child_rss(*a.child_rss[:3], int(a.child_rss[3]))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    art = ensure_artifact(work, a.artifact)
    sections = set(a.sections.split(","))
    print(f"bench_corpus: artifact {art}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if "overhead" in sections:
        section_overhead(art, work, a.rows, a.rounds, a.chunk)
    if "ray" in sections:
        section_ray(art, work, a.ray_rows, a.rounds, a.ray_chunk, not a.no_ray_two_thread_base)
    if "rss" in sections:
        section_rss(art, work, a.rss_rows, a.rss_small, a.chunk)
    if "paper" in sections:
        section_paper(work, a.paper_tokens, a.paper_calls)
    print(f"\nload avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
