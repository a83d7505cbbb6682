"""One contrastive step on demo:tiny-mistral + LoRA, run by torchrun (gloo) or as a single process.

Writes the global loss and the LoRA gradients of a plain step and of a GradCache step (chunks of 3 texts) to
OUT.{plain,gradcache}.{json,safetensors}. Used by test_finetune_distributed.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(data: str, out: str) -> None:
    from safetensors.torch import save_file

    from sfr_export.finetune.config import FinetuneConfig
    from sfr_export.finetune.data import read_jsonl, tasks_of
    from sfr_export.finetune.distributed import all_reduce_mean, init_from_env, wrap_model
    from sfr_export.finetune.step import EmbeddingModel, Tokenizers, collate, contrastive_step
    from sfr_export.finetune.train import build_lora_model
    from sfr_export.models.loading import load_tokenizer, resolve_model

    torch.set_num_threads(1)
    info = init_from_env()
    resolved = resolve_model("demo:tiny-mistral", compute_fingerprint=False)
    examples = read_jsonl(Path(data)).examples
    rows = tasks_of(examples)["Banking77Classification"][:8]
    toks = Tokenizers.make(load_tokenizer(resolved.local_dir), resolved.spec, 32, 32)
    for name, chunk in (("plain", 0), ("gradcache", 3)):
        cfg = FinetuneConfig.from_dict({
            "lora": {"rank": 4}, "train": {"gradient_checkpointing": False},
            "loss": {"temperature": 0.05, "hard_negatives": 2, "in_batch": {"classification": True},
                     "gradcache_chunk": chunk}})
        peft_model = build_lora_model(resolved.local_dir, cfg, info.device)
        g = torch.Generator().manual_seed(1)  # lora_B starts at 0 (all lora_A grads 0): give it seeded values
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model = wrap_model(EmbeddingModel(peft_model, resolved.spec), info)
        batch = collate(examples, rows, spec=resolved.spec, loss=cfg.loss, step=0, seed=0)
        res = contrastive_step(model, batch, toks, cfg.loss, info)
        loss = all_reduce_mean(res.loss, info)
        if info.is_main:
            grads = {n: p.grad.detach().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
            save_file(grads, f"{out}.{name}.safetensors")
            Path(f"{out}.{name}.json").write_text(json.dumps({"loss": loss, "world": info.world}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
