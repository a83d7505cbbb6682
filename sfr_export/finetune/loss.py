"""InfoNCE over a (possibly multi-process) contrastive batch, and GradCache.

A global batch of ``B`` rows is laid out rank-major: process ``r`` holds rows ``r*b .. r*b+b-1`` (``b = B / world``)
and its documents are its ``b`` positives followed by ``b*k`` hard negatives (``k`` per row). After the all-gather
every process sees all ``M = B*(1+k)`` documents in that order and computes the loss of its own rows:

    loss_i = -log( exp(q_i.p_i / t) / sum_{m allowed for i} exp(q_i.d_m / t) )

Allowed documents of row ``i``: its positive and its own hard negatives, and, when in-batch negatives are on for the
row's task type, every other row's positive and negatives, except documents whose text is a positive of row ``i``
(the same text as its positive, or the positive of another row with the same query): those would be false negatives.
The loss is the mean over the process's rows; with DDP's gradient averaging that equals the full-batch mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import TrainingError


@dataclass
class BatchLayout:
    """Index bookkeeping for one process's rows against all documents of the global batch."""

    target: torch.Tensor  # [b] long: column of each local row's positive
    owner: torch.Tensor  # [M] long: global row that owns each document
    row_ids: torch.Tensor  # [b] long: global row id of each local row
    in_batch: torch.Tensor  # [b] bool: in-batch negatives on for this row
    exclude: torch.Tensor  # [b, M] bool: documents that must not act as negatives of this row

    def allowed(self) -> torch.Tensor:
        own = self.owner.unsqueeze(0) == self.row_ids.unsqueeze(1)
        others = self.in_batch.unsqueeze(1) & ~self.exclude
        allowed = own | others
        allowed[torch.arange(len(self.target)), self.target] = True
        return allowed


def build_layout(queries: Sequence[str], positives: Sequence[str], negatives: Sequence[Sequence[str]],
                 in_batch: Sequence[bool], *, world: int = 1, rank: int = 0) -> BatchLayout:
    """Layout for the global batch (rank-major rows); every row has the same number of negatives."""
    B = len(queries)
    if not (len(positives) == len(negatives) == len(in_batch) == B):
        raise TrainingError("queries, positives, negatives and in_batch must have the same length")
    if B % world:
        raise TrainingError(f"global batch of {B} rows does not split evenly over {world} processes")
    k = len(negatives[0]) if B else 0
    if any(len(n) != k for n in negatives):
        raise TrainingError("every row of a batch must carry the same number of hard negatives")
    b = B // world
    per_rank = b * (1 + k)
    owner: list[int] = []
    texts: list[str] = []
    target = []
    for r in range(world):
        rows = range(r * b, (r + 1) * b)
        for i in rows:
            if r == rank:
                target.append(len(owner))
            owner.append(i)
            texts.append(positives[i])
        for i in rows:
            owner.extend([i] * k)
            texts.extend(negatives[i])
    assert len(owner) == world * per_rank
    local = list(range(rank * b, (rank + 1) * b))
    # positives of a row: its own positive and the positives of rows asking the same query
    pos_of: dict[str, set[str]] = {}
    for q, p in zip(queries, positives):
        pos_of.setdefault(q, set()).add(p)
    exclude = torch.zeros(b, len(texts), dtype=torch.bool)
    for li, i in enumerate(local):
        known = pos_of[queries[i]]
        for m, t in enumerate(texts):
            if owner[m] != i and t in known:
                exclude[li, m] = True
    return BatchLayout(target=torch.tensor(target, dtype=torch.long), owner=torch.tensor(owner, dtype=torch.long),
                       row_ids=torch.tensor(local, dtype=torch.long),
                       in_batch=torch.tensor([bool(in_batch[i]) for i in local], dtype=torch.bool), exclude=exclude)


def info_nce(q: torch.Tensor, docs: torch.Tensor, layout: BatchLayout, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of the local rows ``q`` [b, d] against all documents ``docs`` [M, d] (float32 math)."""
    if temperature <= 0:
        raise TrainingError(f"temperature must be > 0, got {temperature}")
    if docs.shape[0] != layout.owner.shape[0] or q.shape[0] != layout.target.shape[0]:
        raise TrainingError(f"embeddings ({q.shape[0]} queries, {docs.shape[0]} documents) do not match the layout "
                            f"({layout.target.shape[0]} rows, {layout.owner.shape[0]} documents)")
    logits = (q.float() @ docs.float().T) / temperature
    logits = logits.masked_fill(~layout.allowed().to(logits.device), float("-inf"))
    return torch.nn.functional.cross_entropy(logits, layout.target.to(logits.device))


# ------------------------------------------------------------------------------------------------------------------
# GradCache (Gao et al., 2021): the contrastive loss of a large batch with the memory of one sub-batch.
# ------------------------------------------------------------------------------------------------------------------
def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def gradcache_backward(encode: Callable[[object], torch.Tensor], query_chunks: Sequence[object],
                       doc_chunks: Sequence[object],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       no_sync: Callable[[], object] | None = None) -> torch.Tensor:
    """Compute ``loss_fn(queries, docs)`` and accumulate its parameter gradients chunk by chunk.

    1. embed every chunk without a graph (RNG state recorded); 2. run the loss on the cached embeddings and get
    d loss / d embedding; 3. re-embed each chunk with a graph (same RNG state) and back-propagate that gradient.
    ``no_sync`` (DDP/FSDP's ``model.no_sync``) defers gradient all-reduce to the last chunk. Returns the loss.
    """
    import contextlib

    chunks = [("q", c) for c in query_chunks] + [("d", c) for c in doc_chunks]
    states, embs = [], []
    with torch.no_grad():
        for _, c in chunks:
            states.append(_rng_state())
            embs.append(encode(c))
    q_cache = torch.cat([e for (s, _), e in zip(chunks, embs) if s == "q"]).detach().requires_grad_(True)
    d_cache = torch.cat([e for (s, _), e in zip(chunks, embs) if s == "d"]).detach().requires_grad_(True)
    loss = loss_fn(q_cache, d_cache)
    loss.backward()
    assert q_cache.grad is not None and d_cache.grad is not None
    grads = {"q": q_cache.grad.split([e.shape[0] for (s, _), e in zip(chunks, embs) if s == "q"]),
             "d": d_cache.grad.split([e.shape[0] for (s, _), e in zip(chunks, embs) if s == "d"])}
    seen = {"q": 0, "d": 0}
    for n, ((side, c), state) in enumerate(zip(chunks, states)):
        g = grads[side][seen[side]]
        seen[side] += 1
        last = n == len(chunks) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx:
            saved = _rng_state()
            _set_rng_state(state)
            emb = encode(c)
            _set_rng_state(saved)
            emb.backward(g.to(emb.dtype))
    return loss.detach()
