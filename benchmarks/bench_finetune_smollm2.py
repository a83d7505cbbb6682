"""CPU-scale proof of the fine-tuning recipe on real weights (demo:smollm2, SmolLM2-135M-Instruct, last token + EOS).

1. builds a task mix from ../shared/data train/dev splits (STSBenchmark dev pairs >= 4, Banking77 train with label
   documents, LegalSummarization's train part);
2. scores the base model: STSBenchmark TEST Spearman (a seeded subset of pairs) and nDCG@10 on LegalSummarization's
   held-out queries (queries never trained on; their relevant documents never used as training positives);
3. fine-tunes with LoRA for a bounded number of steps, once with task-homogeneous batches and once with mixed
   batches, same data, seed, steps and batch size; scores each merged model the same way.

Too slow for CI on a shared 2-core machine; sizes are flags. Run (inside the heavy-run lock):

    flock /tmp/sfr-heavy.lock python benchmarks/bench_finetune_smollm2.py --out /tmp/bench_ft
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

from sfr_export.finetune.config import FinetuneConfig
from sfr_export.finetune.data import build_task, data_root, retrieval_split, write_jsonl
from sfr_export.finetune.evaluate import load_sts_csv, retrieval_ndcg, sts_spearman
from sfr_export.finetune.mining import load_teacher
from sfr_export.finetune.train import train

log = logging.getLogger("bench_finetune")


def eval_sets(args: argparse.Namespace):
    root = data_root()
    s1, s2, gold = load_sts_csv(root / "STSBenchmark" / "stsb-en-test.csv")
    rng = random.Random(args.seed)
    pick = sorted(rng.sample(range(len(gold)), min(args.sts_pairs, len(gold))))
    sts = ([s1[i] for i in pick], [s2[i] for i in pick], [gold[i] for i in pick])
    held = retrieval_split(root / "LegalSummarization", task="LegalSummarization", part="heldout")
    qids = sorted(held.qrels)
    qids = sorted(rng.sample(qids, min(args.ret_queries, len(qids))))
    relevant = sorted({d for q in qids for d in held.qrels[q]})
    others = sorted(set(held.corpus) - set(relevant))
    docs = relevant + sorted(rng.sample(others, min(args.ret_distractors, len(others))))
    ret = ({d: held.corpus[d] for d in docs}, {q: held.queries[q] for q in qids}, {q: held.qrels[q] for q in qids})
    return sts, ret


def score(model_ref: str, sts, ret, args: argparse.Namespace) -> dict[str, float]:
    t0 = time.time()
    emb = load_teacher(model_ref, max_length=args.max_length, batch_size=16)
    out = {"sts_spearman": sts_spearman(emb, *sts, task="STSBenchmark"),
           "legal_ndcg@10": retrieval_ndcg(emb, *ret, task="LegalSummarization")}
    emb.close()
    out["eval_seconds"] = round(time.time() - t0, 1)
    log.info("%s: %s", model_ref, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/bench_finetune"))
    p.add_argument("--model", default="demo:smollm2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--hard-negatives", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=256, help="examples per task")
    p.add_argument("--max-length", type=int, default=32, help="tokens per text (train and eval)")
    p.add_argument("--sts-pairs", type=int, default=64)
    p.add_argument("--ret-queries", type=int, default=12)
    p.add_argument("--ret-distractors", type=int, default=12)
    p.add_argument("--modes", default="homogeneous,mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse-base", type=Path, default=None,
                   help="results(.partial).json of an earlier run with the same eval flags: skip the base scoring")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "httpx", "sfr_export.tokenization"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    examples = []
    for task in ("STSBenchmark", "Banking77Classification", "LegalSummarization"):
        ex, _ = build_task(task, limit=args.train_limit, negatives=args.hard_negatives, seed=args.seed)
        examples += ex
    train_file = args.out / "train.jsonl"
    write_jsonl(train_file, examples)
    sts, ret = eval_sets(args)
    log.info("train examples %d; eval: %d STS test pairs, %d held-out queries x %d documents",
             len(examples), len(sts[2]), len(ret[1]), len(ret[0]))

    if args.reuse_base:  # base scores of an earlier run with the same eval flags (same subsets, same max length)
        prev = json.loads(args.reuse_base.read_text())
        results: dict[str, dict] = {"base": {**prev.get("results", prev)["base"], "from": str(args.reuse_base)}}
    else:
        results = {"base": score(args.model, sts, ret, args)}
    (args.out / "results.partial.json").write_text(json.dumps(results, indent=2))
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        cfg = FinetuneConfig.from_dict({
            "model": {"base": args.model},
            "data": {"train": [str(train_file)], "max_query_length": args.max_length, "max_doc_length": args.max_length},
            "sampler": {"batch_size": args.batch_size, "homogeneous": mode == "homogeneous", "seed": args.seed},
            "loss": {"temperature": args.temperature, "hard_negatives": args.hard_negatives},
            "train": {"output": str(args.out / mode), "steps": args.steps, "learning_rate": args.lr,
                      "warmup_steps": args.warmup, "gradient_checkpointing": False, "save_every": 0,
                      "resume": False, "log_every": 1, "seed": args.seed},
        })
        t0 = time.time()
        res = train(cfg)
        train_s = time.time() - t0
        results[mode] = {**score(str(res.merged_dir), sts, ret, args), "train_seconds": round(train_s, 1),
                         "steps": res.steps, "loss_first": res.losses[0], "loss_last": res.losses[-1],
                         "examples_per_s": round(res.examples_per_s, 2)}
        (args.out / "results.partial.json").write_text(json.dumps(results, indent=2))
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
               "wall_seconds": round(time.time() - t_all, 1), "command": " ".join(sys.argv)}
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'model':<12} {'STSB test Spearman':>19} {'Legal nDCG@10':>14} {'train s':>8} {'steps':>6}")
    for name, r in results.items():
        print(f"{name:<12} {r['sts_spearman']:>19.4f} {r['legal_ndcg@10']:>14.4f} {r.get('train_seconds', 0):>8} "
              f"{r.get('steps', 0):>6}")
    print(f"wall time {summary['wall_seconds']} s; results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
