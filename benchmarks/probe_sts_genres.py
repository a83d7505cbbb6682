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
from bench_int8 import DATA, embed_texts, sts_row  # noqa: E402


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


def pair_cosines(emb: np.ndarray, n: int) -> np.ndarray:
    return (emb[:n] * emb[n:]).sum(1)


def without_genre_shift(s: np.ndarray, c: np.ndarray, gold: np.ndarray, genre: np.ndarray) -> float:
    """ΔSpearman (points) of the pooled set once each genre's mean pair-cosine shift (candidate ``c`` - reference
    ``s``) is subtracted from that genre's candidate cosines."""
    from scipy.stats import spearmanr

    c = c.copy()
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
    if not (args.artifact / "manifest.json").is_file():
        ap.error(f"{args.artifact} is not an sfr-export artifact (no manifest.json)")
    if not sorted((DATA / args.set).glob("*.test.tsv")):
        ap.error(f"no genre files ({DATA / args.set}/*.test.tsv): --set takes STS13, STS14, STS15 or STS16")
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
        ref = embed_texts(te.runner, tok, texts)
    np.save(args.out / "reference.npy", ref)
    s = pair_cosines(ref, n)
    for v in args.variants.split(","):
        stage = man.stage(f"calibrate:{v}")
        with OrtRunner(man.artifact_path(stage.name, "onnx"), intra_op_threads=1,
                       session_config=stage.config.get("ort_session_config") or {}) as r:
            out = embed_texts(r, tok, texts)
        np.save(args.out / f"{v}.npy", out)
        c = pair_cosines(out, n)
        for g in [*tasks, "all"]:
            m = np.ones(n, bool) if g == "all" else genre_a == g
            idx = np.concatenate([np.where(m)[0], n + np.where(m)[0]])
            row = {**sts_row(ref[idx], out[idx], gold_a[m]), "pair_cos_shift_mean": float((c - s)[m].mean())}
            if g == "all":
                row["d_spearman_without_genre_shift"] = without_genre_shift(s, c, gold_a, genre_a)
            print(json.dumps({"variant": v, "genre": g, **row}), flush=True)


if __name__ == "__main__":
    main()
