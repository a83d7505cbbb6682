"""One contrastive micro-step: collate a sampled batch, tokenize this process's shard, embed, InfoNCE, backward.

Shared by the trainer and the distributed test, so both run exactly the same code. Pooling comes from
``sfr_export.pooling`` and tokenization (prompts, explicit EOS, truncation) from ``sfr_export.tokenization``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TrainingError
from ..pooling import pool_and_normalize
from ..spec import ModelSpec
from ..tokenization import TextTokenizer
from .config import LossConfig
from .data import Example, document_instruction
from .distributed import DistInfo, all_gather_with_grad, shard
from .loss import BatchLayout, build_layout, gradcache_backward, info_nce


class EmbeddingModel(torch.nn.Module):
    """backbone (optionally LoRA-wrapped) + the package's pooling + L2 normalisation (cosine InfoNCE)."""

    def __init__(self, backbone: torch.nn.Module, spec: ModelSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_and_normalize(hidden, attention_mask, self.spec.pooling, True)


@dataclass
class GlobalBatch:
    """Formatted texts of the whole (all-process) batch, rank-major."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    in_batch: list[bool]
    task: str | None


def collate(examples: Sequence[Example], indices: Sequence[int], *, spec: ModelSpec, loss: LossConfig,
            step: int, seed: int) -> GlobalBatch:
    """Prompts applied, ``k = min(loss.hard_negatives, fewest negatives in the batch)`` negatives per row,
    sampled per (seed, step, example) so that repeated epochs see different negatives."""
    rows = [examples[i] for i in indices]
    k = min([loss.hard_negatives, *(len(r.negatives) for r in rows)])
    queries, positives, negatives, in_batch = [], [], [], []
    for i, ex in zip(indices, rows):
        q_inst = ex.instruction or None
        d_inst = document_instruction(ex)
        queries.append(spec.apply_prompt([ex.query], instruction=q_inst)[0] if q_inst else spec.format_document(ex.query))
        negs = random.Random(f"{seed}:{step}:{i}").sample(list(ex.negatives), k) if k else []
        docs = [ex.positive, *negs]
        docs = spec.apply_prompt(docs, instruction=d_inst) if d_inst else [spec.format_document(d) for d in docs]
        positives.append(docs[0])
        negatives.append(docs[1:])
        if ex.type not in loss.in_batch:
            raise TrainingError(f"no in-batch setting for task type '{ex.type}'")
        in_batch.append(loss.in_batch[ex.type])
    tasks = {r.task for r in rows}
    return GlobalBatch(queries, positives, negatives, in_batch, tasks.pop() if len(tasks) == 1 else None)


@dataclass
class Tokenizers:
    query: TextTokenizer
    doc: TextTokenizer

    @classmethod
    def make(cls, hf_tokenizer: Any, spec: ModelSpec, max_query_length: int, max_doc_length: int) -> "Tokenizers":
        return cls(TextTokenizer(hf_tokenizer, spec.replace(max_length=min(spec.max_length, max_query_length))),
                   TextTokenizer(hf_tokenizer, spec.replace(max_length=min(spec.max_length, max_doc_length))))


@dataclass
class StepResult:
    loss: float  # this process's mean loss over its rows (before the accumulation scaling)
    tokens: int  # non-padding tokens this process embedded (one forward pass)


def _padded(tok: TextTokenizer, seqs: list[list[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tok.pad(seqs)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def contrastive_step(model: torch.nn.Module, batch: GlobalBatch, toks: Tokenizers, loss_cfg: LossConfig,
                     info: DistInfo, *, scale: float = 1.0, sync: bool = True, autocast: bool = False) -> StepResult:
    """Forward + backward of this process's shard. Gradients accumulate in ``.grad`` (scaled by ``scale``).

    ``sync=False`` defers DDP/FSDP's gradient all-reduce (gradient accumulation). With GradCache the all-reduce
    runs once per micro-step, on its last chunk."""
    layout: BatchLayout = build_layout(batch.queries, batch.positives, batch.negatives, batch.in_batch,
                                       world=info.world, rank=info.rank)
    q_texts = shard(batch.queries, info)
    mine = shard(list(zip(batch.positives, batch.negatives)), info)
    d_texts = [p for p, _ in mine] + [n for _, negs in mine for n in negs]  # local positives, then negatives
    q_seqs = toks.query.encode(q_texts).ids
    d_seqs = toks.doc.encode(d_texts).ids
    tokens = sum(map(len, q_seqs)) + sum(map(len, d_seqs))
    device_type = "cuda" if info.device.startswith("cuda") else "cpu"
    amp = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    no_sync: Callable[[], Any] | None = getattr(model, "no_sync", None)

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return info_nce(q, all_gather_with_grad(d.float()), layout, loss_cfg.temperature)

    if loss_cfg.gradcache_chunk > 0:
        n = loss_cfg.gradcache_chunk

        def encode(seqs: list[list[int]]) -> torch.Tensor:
            with amp():
                return model(*_padded(toks.doc, seqs, info.device)).float()

        q_chunks = [q_seqs[i:i + n] for i in range(0, len(q_seqs), n)]
        d_chunks = [d_seqs[i:i + n] for i in range(0, len(d_seqs), n)]
        loss = gradcache_backward(encode, q_chunks, d_chunks, lambda q, d: loss_fn(q, d) * scale,
                                  no_sync=no_sync if (no_sync is not None and info.enabled) else None)
        return StepResult(float(loss) / scale, tokens)
    # one forward over queries and documents together (DDP expects one forward per backward)
    ids, mask = _padded(toks.doc, q_seqs + d_seqs, info.device)
    ctx = no_sync() if (no_sync is not None and info.enabled and not sync) else contextlib.nullcontext()
    with ctx:
        with amp():
            emb = model(ids, mask).float()
        loss = loss_fn(emb[: len(q_seqs)], emb[len(q_seqs):])
        (loss * scale).backward()
    return StepResult(float(loss.detach()), tokens)

