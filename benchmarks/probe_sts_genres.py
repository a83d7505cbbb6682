"""Where a realized ΔSpearman on a multi-genre STS set comes from: an int8 artifact's forms against its torch fp32
reference, per genre file, on the whole set, and on the whole set with each genre's mean pair-cosine shift removed.

    python benchmarks/probe_sts_genres.py --artifact DIR [--set STS15] [--variants int8-cpu,int8]

STS13-16 are stored one file per genre, and MTEB scores the files pooled. A base decoder such as SmolLM2 orders the
genres differently from the gold scores (its pooled STS15 Spearman is ~10 points against 17-36 within genres), so a
shift of every pair cosine in one genre by the same tiny amount reorders thousands of cross-genre pairs. The last
column tells that shift apart from an error that reorders pairs within a genre. Prints JSON lines; the embeddings are
kept under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import DATA, cos_rows, spearman_figures, sts_score  # noqa: E402


def genre_tasks(name: str, work: Path, limit: int | None) -> dict[str, object]:
    """Each ``*.test.tsv`` of the set loaded alone (a folder per genre, holding a link to its file); ``limit``: its
    first pairs only (a quick check of the script)."""
    from sfr_export.eval.loaders import Limits, load_task

    out = {}
    for f in sorted((DATA / name).glob("*.test.tsv")):
        d = work / "genres" / name / f.name.removesuffix(".test.tsv")
        d.mkdir(parents=True, exist_ok=True)
        if not (d / f.name).exists():
            (d / f.name).symlink_to(f)
        out[d.name] = load_task(d, name, "semeval-sts-tsv", Limits(max_pairs=limit) if limit else Limits())
    return out


def embed(runner, tok, texts: list[str]) -> np.ndarray:
    from sfr_export.stages.calibrate import make_batches

    out: dict[int, np.ndarray] = {}
    for b in make_batches(tok, texts, 32):
        out.update(zip(b.indices, runner.infer(b.input_ids, b.attention_mask)))
    return np.stack([out[i] for i in range(len(texts))])


def figures(ref: np.ndarray, out: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    c = cos_rows(ref, out)
    sp_ref = sts_score(ref, gold)
    return {"pairs": len(gold), "cos_mean": float(c.mean()), "cos_p1": float(np.percentile(c, 1)), "spearman_ref": sp_ref,
            "d_spearman": sts_score(out, gold) - sp_ref, **spearman_figures(ref, out, gold, sp_ref)}


def without_genre_shift(ref: np.ndarray, out: np.ndarray, gold: np.ndarray, genre: np.ndarray) -> float:
    """ΔSpearman (points) of the pooled set once each genre's mean pair-cosine shift (candidate - reference) is
    subtracted from that genre's candidate cosines."""
    from scipy.stats import spearmanr

    n = len(gold)
    s, c = (ref[:n] * ref[n:]).sum(1), (out[:n] * out[n:]).sum(1)
    for g in np.unique(genre):
        m = genre == g
        c[m] -= (c[m] - s[m]).mean()
    return float(100 * (spearmanr(c, gold)[0] - spearmanr(s, gold)[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--set", default="STS15")
    ap.add_argument("--variants", default="int8-cpu,int8")
    ap.add_argument("--out", default="/tmp/sfr-probe-sts-genres", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="the first N pairs of each genre only (a quick check)")
    args = ap.parse_args()
    from sfr_export.artifact import Manifest
    from sfr_export.runtime import Embedder
    from sfr_export.runtime.ort_runner import OrtRunner

    tasks = genre_tasks(args.set, args.out, args.limit)
    a, b, gold, genre = [], [], [], []
    for g, t in tasks.items():
        a += list(t.sentences1)
        b += list(t.sentences2)
        gold += list(t.scores)
        genre += [g] * len(t.scores)
    gold_a, genre_a, n = np.array(gold), np.array(genre), len(gold)
    man = Manifest.load(args.artifact)
    with Embedder.from_artifact(args.artifact, backend="torch") as te:
        tok, texts = te.tokenizer, te.spec.apply_prompt(a + b, "STSBenchmark")
        ref = embed(te.runner, tok, texts)
    np.save(args.out / "reference.npy", ref)
    for v in args.variants.split(","):
        stage = man.stage(f"calibrate:{v}")
        with OrtRunner(man.artifact_path(stage.name, "onnx"), intra_op_threads=1,
                       session_config=stage.config.get("ort_session_config") or {}) as r:
            out = embed(r, tok, texts)
        np.save(args.out / f"{v}.npy", out)
        for g in [*tasks, "all"]:
            m = np.ones(n, bool) if g == "all" else genre_a == g
            idx = np.concatenate([np.where(m)[0], n + np.where(m)[0]])
            row = figures(ref[idx], out[idx], gold_a[m])
            ds = (out[idx][: m.sum()] * out[idx][m.sum():]).sum(1) - (ref[idx][: m.sum()] * ref[idx][m.sum():]).sum(1)
            row["pair_cos_shift_mean"] = float(ds.mean())
            if g == "all":
                row["d_spearman_without_genre_shift"] = without_genre_shift(ref, out, gold_a, genre_a)
            print(json.dumps({"variant": v, "genre": g, **row}), flush=True)


if __name__ == "__main__":
    main()
