"""A full-width, 2-layer Mistral (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32000) with random
weights, laid out like the SFR hub repo (the real Mistral tokenizer and last-token pooling from demo:tiny-mistral),
so export / calibrate / bench see the real layer shapes of SFR-Embedding-Mistral at 2/32 of its depth.

    flock /tmp/sfr-heavy.lock python benchmarks/bench_fullwidth_mistral.py --out /tmp/fullwidth

Writes the model dir (``--out``/model, ~2.3 GB fp32 safetensors) and prints the commands that export, calibrate and
bench it. ``--run`` also runs them (needs ~8 GB RAM; wrap the whole script in ``flock /tmp/sfr-heavy.lock``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def build_model(out: Path, layers: int, seed: int) -> Path:
    import torch
    from transformers import MistralConfig, MistralModel

    from sfr_export.models import resolve_model

    model_dir = out / "model"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    tiny = resolve_model("demo:tiny-mistral", compute_fingerprint=False).local_dir
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # tokenizer and sentence-transformers files (1_Pooling/config.json included); not the weights or the top config
    shutil.copytree(tiny, tmp, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")
                                                        or (Path(d) == Path(tiny) and n == "config.json")])
    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096, sliding_window=None,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MistralModel(cfg).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    tmp.rename(model_dir)
    return model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/sfr-fullwidth"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--seq-lens", default="32,128")
    ap.add_argument("--run", action="store_true", help="also export, calibrate (int8) and bench")
    ap.add_argument("--no-int8", action="store_true")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(a.out, a.layers, a.seed)
    art = a.out / "artifact"
    cli = [sys.executable, "-m", "sfr_export.cli"]
    steps = [cli + ["export", "--model", str(model_dir), "--output", str(art)]]
    if not a.no_int8:
        steps.append(cli + ["calibrate", str(art)])
    steps.append(cli + ["bench", str(art), "--batch-sizes", a.batch_sizes, "--seq-lens", a.seq_lens,
                        "--cell-seconds", "1", "--min-iters", "2", "--max-iters", "5", "-o", str(a.out / "bench.json")])
    for s in steps:
        print("$ " + " ".join(s[2:]).replace("sfr_export.cli", "sfr-export"), flush=True)
        if a.run:
            rc = subprocess.run(s).returncode
            if rc != 0:
                print(f"step failed with exit code {rc}", flush=True)
                if s[3] != "calibrate":
                    raise SystemExit(rc)


if __name__ == "__main__":
    main()
