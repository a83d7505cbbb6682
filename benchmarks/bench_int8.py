"""INT8 benchmark: fidelity table, speed table (side by side, one run), memory, and the sentence-transformers peer.

    python benchmarks/bench_int8.py fidelity [--models minilm,smollm2] [--methods minmax] [--smoothing auto,off]
    python benchmarks/bench_int8.py speed    [--layers 2]        # full-width Mistral, B8 x L128
    python benchmarks/bench_int8.py widespeed --artifact DIR     # that model's built artifact (DIR = OUT/wide2/artifact):
        # torch fp32 eager and ORT int8-cpu alternating, one thread, B8xL128 and B1xL32, medians
    python benchmarks/bench_int8.py peer                          # MiniLM vs sentence-transformers' avx512_vnni int8
    python benchmarks/bench_int8.py smollm2 [--artifact DIR] [--levers] [--other-sts]   # real SmolLM2, one thread:
        # the offered int8 forms and the lever table (row8 / rotated / nbits8) on all 1379 STSB test pairs, the W8A8
        # MAC share of the Q/DQ graph, tokens/s against torch fp32 eager at B8xL128 and B1xL32 side by side
    python benchmarks/bench_int8.py all

Fidelity is measured against the PyTorch fp32 reference on ALL 1379 STSBenchmark test pairs (2758 sentences, STS
instruction for instruction models) and on TRECCOVID (``--trec-queries`` queries with their instruction, the passages they judge, unjudged ones up to
``--trec-passages``). ΔSpearman is reported with its noise floor: the std of ΔSpearman when isotropic noise of
the same mean cosine is added to the reference embeddings (20 draws). Timings are ratios within one run only.
Heavy steps hold /tmp/sfr-heavy.lock. Results go to ``--out`` (JSON + markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = Path(os.environ.get("SFR_EXPORT_DATA_DIR", REPO.parent / "shared" / "data"))
PEER_VENV = REPO / ".venv-peer-st"
PEER_PINS = ["sentence-transformers==5.7.0", "transformers==4.57.6", "optimum-onnx", "tokenizers>=0.22,<0.23",
             "datasets<5"]  # the main venv's datasets 5 needs huggingface-hub >= 1.31; transformers 4.57 pins < 1


def stsb_test() -> tuple[list[str], list[str], np.ndarray]:
    from sfr_export.eval.loaders import Limits, load_stsb_csv

    t = load_stsb_csv(DATA / "STSBenchmark", "STSBenchmark", Limits())
    return list(t.sentences1), list(t.sentences2), np.array(t.scores)


def trec(n_queries: int, n_passages: int) -> Any:
    """TRECCOVID through sfr_export.eval: the first ``n_queries`` queries with a judged passage, all passages they
    judge, then unjudged ones up to ``n_passages`` (all 50 queries judge ~2000 passages: ~25 min per variant for
    SmolLM2 on 2 cores)."""
    from sfr_export.eval.loaders import Limits, load_beir

    return load_beir(DATA / "TRECCOVID", "TRECCOVID", Limits(max_queries=n_queries, max_corpus=n_passages))


def sts_score(emb: np.ndarray, gold: np.ndarray) -> float:
    """STSBenchmark main score (cosine Spearman, points) by sfr_export.eval's MTEB-protocol STS evaluator;
    ``emb`` holds the first sentences then the second ones."""
    from sfr_export.eval.sts import evaluate_sts
    from sfr_export.eval.tasks import StsTask

    n = len(gold)
    task = StsTask("STSBenchmark", ("",) * n, ("",) * n, tuple(float(v) for v in gold), 0.0, 5.0)
    return evaluate_sts(task, {"sentences1": emb[:n], "sentences2": emb[n:]}).main


def spearman_figures(ref: np.ndarray, cand: np.ndarray, gold: np.ndarray, sp_ref: float) -> dict[str, float]:
    """The gate's statistics on these pairs: the realized delta's noise floor (the candidate's own error permuted
    across texts) and the expected delta with its bootstrap std (sfr_export.quant.sensitivity), in points."""
    from sfr_export.quant.sensitivity import expected_spearman_delta, spearman_noise

    expected, spread = expected_spearman_delta(ref, cand, sp_ref)
    return {"noise_floor": spearman_noise(ref, cand, gold), "d_spearman_expected": expected,
            "d_spearman_expected_noise": spread}


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from sfr_export.vectors import row_cosine

    return row_cosine(a, b)


def embed_texts(runner: Any, tok: Any, texts: list[str]) -> np.ndarray:
    """``texts`` embedded by a runner (infer(ids, mask)) in length-sorted batches of 32, returned in input order."""
    from sfr_export.stages.calibrate import make_batches

    out: dict[int, np.ndarray] = {}
    for b in make_batches(tok, texts, 32):
        out.update(zip(b.indices, runner.infer(b.input_ids, b.attention_mask)))
    return np.stack([out[i] for i in range(len(texts))])


def sts_row(ref: np.ndarray, out: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """A candidate's figures on scored pairs (``ref``/``out``: first sentences, then second ones) against its
    reference: cosine, realized and expected ΔSpearman with their floors, and whether the issue's targets hold."""
    c = cos_rows(ref, out)
    sp_ref, sp = sts_score(ref, gold), sts_score(out, gold)
    return {"pairs": len(gold), "cos_mean": float(c.mean()), "cos_p1": float(np.percentile(c, 1)),
            "cos_min": float(c.min()), "spearman_ref": sp_ref, "d_spearman": sp - sp_ref,
            **spearman_figures(ref, out, gold, sp_ref),
            "meets": bool(c.mean() >= 0.995 and np.percentile(c, 1) >= 0.98 and abs(sp - sp_ref) <= 0.3)}


def encode_all(emb, s1, s2, tr) -> tuple[dict[str, np.ndarray], float, int]:
    t = time.perf_counter()
    out = {"s": emb.encode(s1 + s2, prompt="STSBenchmark"), "q": emb.encode_queries(list(tr.query_texts), task="TRECCOVID"),
           "p": emb.encode_documents(list(tr.corpus_texts), task="TRECCOVID")}
    sec = time.perf_counter() - t
    toks = sum(len(x) for x in emb.tokenize(s1 + s2, prompt="STSBenchmark").ids)
    return out, sec, toks


def ndcg10(tr, e: dict) -> float:
    from sfr_export.eval.retrieval import evaluate_retrieval

    return evaluate_retrieval(tr, {"queries": e["q"], "corpus": e["p"]}).main


def fidelity_row(name: str, ref: dict, cand: dict, gold: np.ndarray, sec: float, ref_sec: float, tr: Any) -> dict:
    n = len(gold)
    c = cos_rows(ref["s"], cand["s"])
    sp_ref = sts_score(ref["s"], gold)
    sp = sts_score(cand["s"], gold)
    cq, cp = cos_rows(ref["q"], cand["q"]), cos_rows(ref["p"], cand["p"])
    from scipy.stats import spearmanr

    nd = ndcg10(tr, cand)
    rank = float(spearmanr((ref["q"] @ ref["p"].T).ravel(), (cand["q"] @ cand["p"].T).ravel()).statistic)
    return {"variant": name, "cos_mean": float(c.mean()), "cos_p1": float(np.percentile(c, 1)), "cos_min": float(c.min()),
            "spearman": sp, "d_spearman": sp - sp_ref, **spearman_figures(ref["s"], cand["s"], gold, sp_ref),
            "trec_query_cos": float(cq.mean()), "trec_passage_cos": float(cp.mean()), "trec_score_rank_corr": rank,
            "trec_ndcg10": nd, "d_trec_ndcg10": nd - ndcg10(tr, ref),
            "speed_vs_torch_fp32": ref_sec / sec,
            "meets": bool(c.mean() >= 0.995 and np.percentile(c, 1) >= 0.98 and abs(sp - sp_ref) <= 0.3)}


def cmd_fidelity(args) -> dict:
    from sfr_export.models import resolve_model
    from sfr_export.runtime import Embedder
    from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate
    from sfr_export.stages.export import ExportConfig, run_export

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s1, s2, gold = stsb_test()
    tr = trec(args.trec_queries, args.trec_passages)
    results = {}
    for model in args.models.split(","):
        resolved = resolve_model(f"demo:{model}")
        base = Path(args.out) / model / "fp32"
        run_export(base, resolved, ExportConfig())
        with Embedder.from_artifact(base, backend="torch") as e:
            ref, ref_sec, toks = encode_all(e, s1, s2, tr)
        rows = []
        if not args.no_bf16:
            with Embedder.from_artifact(base, backend="torch", torch_dtype="bfloat16") as e:
                out, sec, _ = encode_all(e, s1, s2, tr)
            rows.append(fidelity_row("torch bf16", ref, out, gold, sec, ref_sec, tr))
            print(json.dumps(rows[-1]), flush=True)
        with Embedder.from_artifact(base, variant="fp32", intra_op_threads=args.threads) as e:
            out, sec, _ = encode_all(e, s1, s2, tr)
        rows.append(fidelity_row("ORT fp32", ref, out, gold, sec, ref_sec, tr))
        print(json.dumps(rows[-1]), flush=True)
        for method in args.methods.split(","):
            for smooth in args.smoothing.split(","):
                d = Path(args.out) / model / f"{method}-{smooth}"
                if not (d / "manifest.json").is_file():
                    shutil.copytree(base, d, ignore=shutil.ignore_patterns("logs"))
                t = time.perf_counter()
                recs = run_calibrate(d, CalibrateConfig(method=method, smoothquant=smooth, cpu_form=(smooth == args.smoothing.split(",")[0])))
                cal_sec = time.perf_counter() - t
                for r in recs:
                    v = r.config["variant"]
                    with Embedder.from_artifact(d, variant=v, intra_op_threads=args.threads) as e:
                        out, sec, _ = encode_all(e, s1, s2, tr)
                    row = fidelity_row(f"{v} {method} smooth={smooth}", ref, out, gold, sec, ref_sec, tr)
                    row.update(build_status=r.status, calibrate_seconds=cal_sec, modes=r.figures.get("mixed_precision", {}).get("modes"),
                               bytes=sum(a.bytes for a in r.artifacts))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        results[model] = {"tokens": toks, "torch_fp32_seconds": ref_sec, "rows": rows,
                          "fp32_bytes": sum(p.stat().st_size for p in (base / "onnx" / "fp32").iterdir())}
    return results


def cmd_speed(args) -> dict:
    """Full-width Mistral (hidden 4096, 2 layers): torch fp32 eager vs ORT fp32 / int8 Q/DQ / int8-cpu, B8 x L128."""
    import resource

    import torch

    from bench_export_memory import heavy_lock, make_wide_mistral
    from sfr_export.models import resolve_model
    from sfr_export.runtime import Embedder
    from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate
    from sfr_export.stages.export import ExportConfig, run_export

    work = Path(args.out) / f"wide{args.layers}"
    mdir = work / "model"
    if not (mdir / "config.json").is_file():
        with heavy_lock():
            make_wide_mistral(mdir, args.layers)
    out = work / "artifact"
    resolved = resolve_model(str(mdir))
    with heavy_lock():
        run_export(out, resolved, ExportConfig(validate=False))
        t = time.perf_counter()
        recs = run_calibrate(out, CalibrateConfig(samples=32, holdout=16, pairs=48, smoothquant="off",
                                                  reference_dtype=args.reference_dtype), force=True)
        cal_sec = time.perf_counter() - t
    ids = np.random.default_rng(0).integers(100, 30000, size=(8, 128)).astype(np.int64)
    mask = np.ones_like(ids)
    res = {"calibrate_seconds": cal_sec, "calibrate_worker_peak_rss_mb": recs[0].figures.get("worker_peak_rss_mb"),
           "calibrate_peak_rss_mb_while_torch_model_held": recs[0].figures.get("peak_rss_mb_with_torch_model"),
           "calibrate_reference_dtype": recs[0].figures.get("reference_dtype"), "params": total_params(args.layers),
           "sizes": {}, "tokens_per_s": {}, "status": {r.name: r.status for r in recs},
           "int8_qdq_modes": recs[0].figures.get("mixed_precision", {}).get("modes"),
           "int8_cpu_chosen": recs[-1].figures.get("chosen"),
           "int8_cpu_tries": [{k: t.get(k) for k in ("candidate", "cos_mean", "cos_p1", "spearman_delta", "met")}
                              for t in recs[-1].figures.get("tries", [])]}
    for v in ("fp32", "int8", "int8-cpu"):
        d = out / "onnx" / v
        res["sizes"][v] = sum(p.stat().st_size for p in d.iterdir())

    def bench(fn, reps: int = 3) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return ids.size / float(np.median(ts))

    with heavy_lock():
        with Embedder.from_artifact(out, backend="torch") as e:
            res["tokens_per_s"]["torch fp32 eager"] = bench(lambda: e.runner.infer(ids, mask))
        with Embedder.from_artifact(out, backend="torch", torch_dtype="bfloat16") as e:
            res["tokens_per_s"]["torch bf16 eager"] = bench(lambda: e.runner.infer(ids, mask))
        for v in ("fp32", "int8", "int8-cpu"):
            with Embedder.from_artifact(out, variant=v) as e:
                res["tokens_per_s"][f"ORT {v}"] = bench(lambda: e.runner.infer(ids, mask))
        res["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["gemm_peaks"] = gemm_peaks()
    res["int8_peak_gops"] = res["gemm_peaks"]["int8_gops"]
    lin = linear_params(args.layers)
    for k, tps in res["tokens_per_s"].items():
        res.setdefault("gops", {})[k] = 2 * lin * tps / 1e9
    res["int8_cpu_fraction_of_int8_peak"] = res["gops"]["ORT int8-cpu"] / res["int8_peak_gops"]
    res["ratio_int8_cpu_vs_torch_fp32"] = res["tokens_per_s"]["ORT int8-cpu"] / res["tokens_per_s"]["torch fp32 eager"]
    res["ratio_int8_qdq_vs_ort_fp32"] = res["tokens_per_s"]["ORT int8"] / res["tokens_per_s"]["ORT fp32"]
    peak = res["calibrate_worker_peak_rss_mb"] or 0
    res["calibrate_peak_bytes_per_param"] = peak * 2 ** 20 / total_params(args.layers)
    res["calibrate_peak_extrapolated_7b_gib"] = res["calibrate_peak_bytes_per_param"] * 7.24e9 / 2 ** 30
    return res


def cmd_widespeed(args) -> dict:
    """The full-width Mistral artifact that ``speed`` built (``--artifact``): torch fp32 eager and ORT int8-cpu
    alternating, one thread, medians, with the int8 GEMM peak of the same run."""
    import torch

    from sfr_export.artifact import Manifest
    from sfr_export.runtime import Embedder
    from sfr_export.runtime.ort_runner import OrtRunner

    if not args.artifact:
        raise SystemExit("widespeed needs --artifact DIR (the dir `speed` built: OUT/wide2/artifact)")
    from sfr_export.errors import ArtifactError

    root = Path(args.artifact)
    try:
        man = Manifest.load(root)
    except ArtifactError as exc:
        raise SystemExit(f"widespeed: {exc}") from None
    rec = man.stage("calibrate:int8-cpu")
    if rec is None or rec.status != "ok":
        raise SystemExit(f"widespeed: {root} has no int8-cpu variant the build offered (run `bench_int8.py speed` "
                         "to build one)")
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        te = stack.enter_context(Embedder.from_artifact(root, backend="torch"))
        cpu = stack.enter_context(OrtRunner(man.artifact_path(rec.name, "onnx"), intra_op_threads=1,
                                            session_config=dict(rec.config["ort_session_config"])))
        res = time_alternating({"torch fp32 eager": te.runner.infer, "ORT int8-cpu": cpu.infer},
                               {(8, 128): args.reps, (1, 32): 3 * args.reps})
    res["gemm_peaks_1thread"] = gemm_peaks(threads=1)
    res["int8_cpu_chosen"] = rec.figures.get("chosen")
    return res


def linear_params(layers: int) -> int:
    h, i, kv = 4096, 14336, 1024
    return layers * (h * h * 2 + h * kv * 2 + 3 * h * i)


def total_params(layers: int) -> int:
    return linear_params(layers) + 32000 * 4096


def gemm_peaks(threads: int = 0, reps: int = 5) -> dict[str, Any]:
    """This machine's GEMM peaks, measured now with ORT on [1024, 4096] x [4096, 4096], the two timed alternately
    (medians): the int8 kernel the runtime serves here (u8 x s8; u8 x u8 where u8 x s8 saturates, as on CPUs
    without VNNI: sfr_export/runtime/ort_int8.py) and fp32 MatMul. Their ratio bounds any int8 speedup here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sfr_export.runtime.ort_int8 import u8s8_saturates

    m, k, n = 1024, 4096, 4096
    rng = np.random.default_rng(0)
    u8 = u8s8_saturates()
    b8 = rng.integers(0, 255, (k, n), dtype=np.uint8) if u8 else rng.integers(-127, 127, (k, n), dtype=np.int8)
    graphs = {
        "int8": helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "mmi",
                                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                                  [numpy_helper.from_array(b8, "b")]),
        "fp32": helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
                                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                                  [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "b")])}
    inputs = {"int8": rng.integers(0, 255, (m, k), dtype=np.uint8), "fp32": rng.standard_normal((m, k)).astype(np.float32)}
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sessions = {kind: ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
                                           .SerializeToString(), so, providers=["CPUExecutionProvider"])
                for kind, g in graphs.items()}
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for kind, sess in sessions.items():
        sess.run(None, {"a": inputs[kind]})
    for _ in range(reps):
        for kind, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"a": inputs[kind]})
            times[kind].append(time.perf_counter() - t)
    gops = {kind: 2 * m * k * n / float(np.median(ts)) / 1e9 for kind, ts in times.items()}
    return {"int8_gops": gops["int8"], "fp32_gops": gops["fp32"], "int8_to_fp32": gops["int8"] / gops["fp32"],
            "int8_kernel": "u8 x u8 (u8 x s8 saturates on this CPU)" if u8 else "u8 x s8"}


# ----------------------------------------------------------------------------------------------------------------
# Peer: sentence-transformers' own int8 export, in its own venv (optimum-onnx pins transformers < 4.58)
# ----------------------------------------------------------------------------------------------------------------
PEER_SCRIPT = r'''
import json, sys, time, shutil, numpy as np
from pathlib import Path
from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model
src, work, texts_path = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
texts = json.loads(texts_path.read_text())
if work.exists(): shutil.rmtree(work)
shutil.copytree(src, work)
m = SentenceTransformer(str(work), backend="onnx", device="cpu")
m.save_pretrained(str(work))
export_dynamic_quantized_onnx_model(m, "avx512_vnni", str(work))
q = SentenceTransformer(str(work), backend="onnx", device="cpu", model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"})
q.encode(texts[:64], batch_size=32)
t = time.perf_counter(); e = q.encode(texts, batch_size=32, normalize_embeddings=True); sec = time.perf_counter() - t
np.save(work / "peer_emb.npy", e)
print("PEER " + json.dumps({"seconds": sec, "n": len(texts)}))
'''


def ensure_peer_venv() -> Path:
    py = PEER_VENV / "bin" / "python"
    if py.is_file():
        return py
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    # torch (CPU) and onnxruntime come from the main venv through a .pth appended AFTER the peer's own
    # site-packages, so the peer's pinned transformers 4.57.6 shadows the main venv's transformers 5.
    site = next((PEER_VENV / "lib").glob("python*/site-packages"))
    main_site = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "zz_main_venv.pth").write_text(main_site + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    return py


def cmd_peer(args) -> dict:
    from sfr_export.models import resolve_model
    from sfr_export.runtime import Embedder
    from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate
    from sfr_export.stages.export import ExportConfig, run_export

    s1, s2, gold = stsb_test()
    texts = s1 + s2
    resolved = resolve_model("demo:minilm")
    root = Path(args.out) / "peer" / "ours"
    base = Path(args.out) / "minilm" / "fp32"
    if not (root / "manifest.json").is_file() and (base / "manifest.json").is_file():
        shutil.copytree(base, root, ignore=shutil.ignore_patterns("logs"))  # the fidelity run's export
    run_export(root, resolved, ExportConfig())
    run_calibrate(root, CalibrateConfig(), force=True)  # the CPU form's choice is not part of the config
    try:
        py = ensure_peer_venv()
    except (subprocess.CalledProcessError, StopIteration) as exc:
        return {"error": f"could not build the peer venv ({exc}); sentence-transformers 5.7.0 + transformers 4.57.6 + optimum-onnx needed"}
    tp = Path(args.out) / "peer" / "texts.json"
    tp.write_text(json.dumps(texts))
    work = Path(args.out) / "peer" / "st"
    script = Path(args.out) / "peer" / "peer.py"
    script.write_text(PEER_SCRIPT)
    res = {}
    n = len(gold)
    with Embedder.from_artifact(root, backend="torch") as e:
        t = time.perf_counter()
        ref = e.encode(texts, batch_size=32)
        res["torch_fp32_seconds"] = time.perf_counter() - t
    sp_ref = sts_score(ref, gold)
    for v in ("int8", "int8-cpu"):
        with Embedder.from_artifact(root, variant=v, batch_size=32) as e:
            e.encode(texts[:64])
            t = time.perf_counter()
            out = e.encode(texts)
            sec = time.perf_counter() - t
        c = cos_rows(ref, out)
        res[f"ours {v}"] = {"seconds": sec, "speed_vs_torch": res["torch_fp32_seconds"] / sec, "cos_mean": float(c.mean()),
                            "cos_p1": float(np.percentile(c, 1)), "d_spearman": sts_score(out, gold) - sp_ref}
    proc = subprocess.run([str(py), str(script), str(resolved.local_dir), str(work), str(tp)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER ")), None)
    if line is None:
        res["peer"] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] }
        return res
    info = json.loads(line[5:])
    pe = np.load(work / "peer_emb.npy")
    c = cos_rows(ref, pe)
    res["peer st avx512_vnni"] = {"seconds": info["seconds"], "speed_vs_torch": res["torch_fp32_seconds"] / info["seconds"],
                                  "cos_mean": float(c.mean()), "cos_p1": float(np.percentile(c, 1)),
                                  "d_spearman": sts_score(pe, gold) - sp_ref}
    return res


# ----------------------------------------------------------------------------------------------------------------
# Real SmolLM2: offered forms + lever table, one thread, side by side
# ----------------------------------------------------------------------------------------------------------------
OTHER_STS = (("STS13", "semeval-sts-tsv"), ("STS14", "semeval-sts-tsv"), ("STS15", "semeval-sts-tsv"), ("STS16", "semeval-sts-tsv"),
             ("BIOSSES", "biosses-tsv"))


def _smol_artifact(args) -> Path:
    """The calibrated demo:smollm2 dir (``--artifact``), else export + calibrate with the CI test's settings."""
    from sfr_export.models import resolve_model
    from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate
    from sfr_export.stages.export import ExportConfig, run_export

    if args.artifact:
        return Path(args.artifact)
    root = Path(args.out) / "smollm2-int8"
    run_export(root, resolve_model("demo:smollm2"), ExportConfig(validate=False))
    run_calibrate(root, CalibrateConfig(samples=64, holdout=24, pairs=100))
    return root


def _lever_models(root: Path, work: Path, only: str = "") -> dict[str, Path]:
    """The lever table's CPU variants: the calibrate stage's own candidates that need no sensitivity ranking, plus
    float weights rotated (an exactness check of the rotation), written by the stage's own writer."""
    from dataclasses import replace

    import onnx

    from sfr_export.artifact import Manifest, load_spec
    from sfr_export.models import load_backbone
    from sfr_export.quant import observe as obs, qdq
    from sfr_export.spec import PoolingMode
    from sfr_export.stages.calibrate import CpuCandidate, cpu_candidates, write_cpu_candidate
    from sfr_export.stages.export import plan_attention_from_dir

    src = root / "onnx" / "fp32" / "model.onnx"
    model_dir = Path(Manifest.load(root).model["local_dir"])
    model, plan = load_backbone(model_dir), plan_attention_from_dir(model_dir)
    mapping = qdq.map_matmuls(onnx.load(str(src), load_external_data=False),
                              {n: tuple(m.weight.shape) for n, m in obs.linear_modules(model).items()})
    cands = [c for c in cpu_candidates(list(mapping), {}, set(), last_token=load_spec(root).pooling is PoolingMode.LASTTOKEN)
             if len(set(c.modes.values())) == 1 and any(x in c.label for x in only.split(","))]  # one mode: no sensitivity order
    if not only or "exactness" in only:
        cands.append(CpuCandidate("float, rotated (exactness)", {n: "float" for n in mapping}, frozenset(mapping)))
    base = next(c for c in cpu_candidates(list(mapping), {}, set(), last_token=True) if c.fold)
    if "int8pooled" in only:  # the folded candidate with the pooled and first rows plain per-token int8 (no digit)
        cands.append(replace(base, label=base.label.replace("rows exact", "rows int8 (int8pooled)"),
                             pooled_exact=False, first_exact=False))
    if "pooledonly" in only:  # the folded candidate with the second digit on the pooled rows alone
        cands.append(replace(base, label=base.label.replace("pooled and first rows exact", "pooled rows exact (pooledonly)"),
                             first_exact=False))
    fold = _lever_fold(root, src, mapping, model) if any(c.fold for c in cands) else None
    del model
    out = {}
    for c in cands:
        path = work / f"lever{len(out)}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_cpu_candidate(src, path, mapping, c, seed=0, attention=plan, fold=fold if c.fold else None)  # nearest
        out[c.label] = path
    return out


def _lever_fold(root: Path, src: Path, mapping: dict, model: Any) -> Any:
    """The residual fold as the calibrate stage plans it: float channels found on the recipe's calibration texts
    (the CI test's 64 samples), seed 0."""
    from sfr_export.artifact import load_spec
    from sfr_export.models import load_tokenizer
    from sfr_export.quant.fold import massive_channels, plan_for_graph
    from sfr_export.quant.recipe import load_recipe, sample_recipe
    from sfr_export.stages.calibrate import FOLD_FLOAT_CHANNELS, make_batches
    from sfr_export.tokenization import TextTokenizer

    spec = load_spec(root)
    tt = TextTokenizer(load_tokenizer(root / "tokenizer"), spec)
    cs = sample_recipe(load_recipe("default", samples=64, holdout=24), tt, spec)
    keep = massive_channels(model, make_batches(tt, [c.text for c in cs.calibration], 8), FOLD_FLOAT_CHANNELS)
    return plan_for_graph(src, mapping, keep, seed=0)


def _skipped(label: str, skip: str) -> bool:
    """Whether ``label`` holds one of the comma-separated substrings of ``skip``."""
    return any(x and x in label for x in skip.split(","))


def _sts_sets(other: bool, cap: int) -> list[tuple[str, list[str], np.ndarray]]:
    """All 1379 STSB test pairs; the other STS sets subsampled to ``cap`` pairs each (seeded, over the whole file:
    STS13-16 are stored by sub-genre, so the first N would be one genre)."""
    from sfr_export.eval.loaders import Limits, load_task

    s1, s2, gold = stsb_test()
    sets = [("STSBenchmark", s1 + s2, gold)]
    for name, fmt in (OTHER_STS if other else ()):
        t = load_task(DATA / name, name, fmt, Limits())
        n = len(t.scores)
        idx = np.sort(np.random.default_rng(0).choice(n, size=min(cap, n), replace=False))
        a, b = [t.sentences1[i] for i in idx], [t.sentences2[i] for i in idx]
        sets.append((f"{name} ({len(idx)} of {n} pairs)", a + b, np.array([t.scores[i] for i in idx])))
    return sets


def time_alternating(fns: dict[str, Any], shapes: dict[tuple[int, int], int], vocab: tuple[int, int] = (100, 30000)) -> dict:
    """tokens/s of each ``fn(ids, mask)`` at each [B, L] shape (reps timed runs each), the functions alternating
    within every rep, medians; ``x_torch_fp32`` is each one's speed against the first function's (torch fp32)."""
    res = {}
    base = next(iter(fns))
    for (b, length), n in shapes.items():
        ids = np.random.default_rng(0).integers(*vocab, size=(b, length)).astype(np.int64)
        mask = np.ones_like(ids)
        for f in fns.values():
            f(ids, mask)
        ts: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(n):
            for k, f in fns.items():
                t = time.perf_counter()
                f(ids, mask)
                ts[k].append(time.perf_counter() - t)
        med = {k: float(np.median(v)) for k, v in ts.items()}
        res[f"B{b}xL{length}"] = {k: {"tokens_per_s": ids.size / m, "x_torch_fp32": med[base] / m} for k, m in med.items()}
    return res


def _smol_speed(root: Path, variants: dict[str, tuple[str, Path]], reps: dict[tuple[int, int], int]) -> dict:
    """tokens/s, one thread, torch fp32 eager and every variant alternating, medians."""
    import torch

    from sfr_export.runtime import Embedder
    from sfr_export.runtime.ort_runner import OrtRunner

    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        te = stack.enter_context(Embedder.from_artifact(root, backend="torch"))
        fns = {"torch fp32 eager": te.runner.infer}
        for k, (cfg, p) in variants.items():
            fns[k] = stack.enter_context(OrtRunner(p, intra_op_threads=1, session_config=cfg)).infer
        return time_alternating(fns, reps)


def _smol_linear_macs_per_token(h: int = 576, i: int = 1536, kv: int = 192, layers: int = 30) -> int:
    """Linear multiply-adds per token of a Llama/Mistral decoder (q, o: h x h; k, v: h x kv; gate, up, down: h x i);
    the defaults are SmolLM2-135M's."""
    return layers * (h * h * 2 + h * kv * 2 + 3 * h * i)


def smol_variants(root: Path, args) -> dict[str, tuple[dict, Path]]:
    """label -> (ORT session config, model path): ORT fp32, the artifact's offered int8 forms, and the levers."""
    from sfr_export.artifact import Manifest
    from sfr_export.stages.calibrate import CPU_SESSION_CONFIG

    man = Manifest.load(root)
    variants: dict[str, tuple[dict, Path]] = {}
    if not args.no_ort_fp32:
        fp32 = root / "onnx" / "fp32"
        variants["ORT fp32"] = ({}, next(p for p in (fp32 / "model.cpu.onnx", fp32 / "model.onnx") if p.exists()))
    for rec in () if args.no_offered else (man.stage("calibrate:int8"), man.stage("calibrate:int8-cpu")):
        if rec is not None:
            v = rec.config["variant"]
            variants[f"offered {v} ({rec.status}; {rec.figures.get('chosen') or rec.figures['mixed_precision']['modes']})"] = (
                dict(rec.config["ort_session_config"]), man.artifact_path(rec.name, "onnx"))
    if args.levers is not None:
        variants.update({f"lever {k}": (CPU_SESSION_CONFIG, p) for k, p in _lever_models(root, Path(args.out) / "levers", args.levers).items()})
    return variants


def cmd_smollm2(args) -> dict:
    """Fidelity of every offered int8 form (and the levers) on real SmolLM2 + speed side by side, one thread."""
    import torch

    from sfr_export.artifact import Manifest
    from sfr_export.quant.qdq import w8a8_mac_share
    from sfr_export.runtime import Embedder
    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.stages.calibrate import QDQ_SESSION_CONFIG

    torch.set_num_threads(1)
    root = _smol_artifact(args)
    man = Manifest.load(root)
    variants = smol_variants(root, args)
    res: dict[str, Any] = {"artifact": str(root), "rows": {}, "qdq": {}}
    qrec = man.stage("calibrate:int8")
    if qrec is not None:
        res["qdq"] = {**w8a8_mac_share(man.artifact_path("calibrate:int8", "onnx")),
                      "modes": qrec.figures["mixed_precision"]["modes"], "session": QDQ_SESSION_CONFIG}
    with Embedder.from_artifact(root, backend="torch") as te:  # the artifact's tokenizer, spec and torch reference
        tok = te.tokenizer
        sets = [(name, te.spec.apply_prompt(texts, "STSBenchmark"), gold) for name, texts, gold in _sts_sets(args.other_sts, args.other_sts_pairs)]
        refs = {} if args.no_fidelity else {name: embed_texts(te.runner, tok, texts) for name, texts, _ in sets}
    for k, (cfg, path) in (variants.items() if not args.no_fidelity else ()):
        row = {}
        with OrtRunner(path, intra_op_threads=1, session_config=cfg) as r:
            for name, texts, gold in sets:
                if (name != "STSBenchmark" and (not k.startswith("offered ") or _skipped(k, args.other_sts_skip))) or (
                        args.lever_speed_only and k.startswith("lever")):
                    continue  # other STS sets: the offered forms only
                row[name] = sts_row(refs[name], embed_texts(r, tok, texts), gold)
        res["rows"][k] = row
        print(json.dumps({k: row}), flush=True)
    if not args.no_speed:
        timed = {k: v for k, v in variants.items() if not _skipped(k, args.speed_skip)}
        res["speed"] = _smol_speed(root, timed, {(8, 128): args.reps, (1, 32): 6 * args.reps})
        res["gemm_peaks_1thread"] = gemm_peaks(threads=1)
        peak = res["gemm_peaks_1thread"]["int8_gops"]
        for k, v in res["speed"]["B8xL128"].items():  # linear MACs only (attention excluded)
            v["fraction_of_int8_peak"] = 2 * _smol_linear_macs_per_token() * v["tokens_per_s"] / 1e9 / peak
        print(json.dumps(res["speed"]), flush=True)
    return res


def render_md(what: str, res: dict) -> str:
    if what != "fidelity":
        return "```json\n" + json.dumps(res, indent=2, default=str) + "\n```\n"
    lines = []
    for model, r in res.items():
        lines += [f"### {model} (torch fp32 reference; {r['tokens']} STSB tokens)", "",
                  "| variant | cos mean | cos p1 | cos min | dSpearman (noise floor) | TREC q/p cos | dnDCG@10 | speed vs torch | build | modes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['variant']} | {x['cos_mean']:.5f} | {x['cos_p1']:.5f} | {x['cos_min']:.5f} | "
                         f"{x['d_spearman']:+.2f} (±{x['noise_floor']:.2f}) | {x['trec_query_cos']:.4f}/{x['trec_passage_cos']:.4f} | "
                         f"{x['d_trec_ndcg10']:+.2f} | {x['speed_vs_torch_fp32']:.2f}x | {x.get('build_status', '')} | {x.get('modes', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["fidelity", "speed", "widespeed", "peer", "smollm2", "all"])
    ap.add_argument("--artifact", default=None, help="smollm2: a calibrated demo:smollm2 dir (default: build one)")
    ap.add_argument("--levers", nargs="?", const="", default=None, help="smollm2: also the lever variants (row8, "
                    "folded, rotated, nbits8); a value keeps the levers whose label holds one of its comma-separated words "
                    "('int8pooled' adds the folded form without the second digit, 'pooledonly' with it on the pooled "
                    "rows alone, not on the first rows)")
    ap.add_argument("--other-sts", action="store_true", help="smollm2: also STS13-16 and BIOSSES")
    ap.add_argument("--other-sts-pairs", type=int, default=400, help="smollm2: pairs per other STS set (seeded subsample)")
    ap.add_argument("--other-sts-skip", default="", help="smollm2: comma-separated substrings of offered forms not to "
                    "score on the other STS sets")
    ap.add_argument("--no-speed", action="store_true", help="smollm2: fidelity only")
    ap.add_argument("--no-fidelity", action="store_true", help="smollm2: speed only")
    ap.add_argument("--no-ort-fp32", action="store_true", help="smollm2: leave the ORT fp32 row out")
    ap.add_argument("--no-offered", action="store_true", help="smollm2: leave the artifact's own int8 forms out")
    ap.add_argument("--speed-skip", default="", help="smollm2: comma-separated substrings of variants not to time")
    ap.add_argument("--lever-speed-only", action="store_true", help="smollm2: levers timed, not scored")
    ap.add_argument("--reps", type=int, default=7, help="smollm2: timed runs per shape (B1xL32: 6x as many); widespeed: the same (B1xL32: 3x)")
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--methods", default="minmax")
    ap.add_argument("--smoothing", default="auto,off")
    ap.add_argument("--trec-queries", type=int, default=5)
    ap.add_argument("--trec-passages", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="fidelity: torch and ORT intra-op threads (default: theirs)")
    ap.add_argument("--no-bf16", action="store_true", help="fidelity: skip the torch bf16 row")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reference-dtype", default="bfloat16", help="speed: torch dtype calibrate uses on the wide model "
                    "(bfloat16 = the path `auto` takes for a 7B)")
    ap.add_argument("--out", default="/tmp/sfr-bench-int8")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    todo = ["fidelity", "speed", "peer"] if args.what == "all" else [args.what]
    for w in todo:
        res = {"fidelity": cmd_fidelity, "speed": cmd_speed, "widespeed": cmd_widespeed, "peer": cmd_peer, "smollm2": cmd_smollm2}[w](args)
        (Path(args.out) / f"{w}.json").write_text(json.dumps(res, indent=2, default=str))
        (Path(args.out) / f"{w}.md").write_text(render_md(w, res))
        print(f"== {w}\n" + json.dumps(res, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
