"""The batching queue in-process: grouping by wait/budget, in-order scatter, the queue bound, drain on close."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from sfr_export.errors import UserInputError
from sfr_export.runtime.embedder import BatchStats
from sfr_export.serve import ApiError, BatchingConfig, BatchQueue


def _seqs(emb, tag: str, n: int) -> list[list[int]]:
    return emb.tokenize([f"{tag} number {i} " + "word " * (i % 5) for i in range(n)]).ids


def test_concurrent_submits_are_grouped_and_scattered_in_order(direct_embedder) -> None:
    batches: list[BatchStats] = []
    groups: list[int] = []

    async def main() -> list[np.ndarray]:
        q = BatchQueue(direct_embedder, BatchingConfig(max_batch_tokens=100_000, max_batch_size=64, max_wait_ms=300),
                       on_batch=batches.append, on_group=lambda n, _w: groups.append(n))
        q.start()
        reqs = [_seqs(direct_embedder, f"req{r}", 1 + r % 4) for r in range(10)]
        outs = await asyncio.gather(*(q.submit(s) for s in reqs))
        await q.close()
        return reqs, outs

    reqs, outs = asyncio.run(main())
    assert groups == [sum(len(s) for s in reqs)]  # one group: all ten requests arrived inside max_wait_ms
    assert sum(b.rows for b in batches) == groups[0]
    for seqs, out in zip(reqs, outs):
        np.testing.assert_allclose(out, direct_embedder.encode_ids(seqs), atol=1e-5)


def test_token_budget_closes_a_group_before_the_deadline(direct_embedder) -> None:
    groups: list[int] = []

    async def main() -> float:
        q = BatchQueue(direct_embedder, BatchingConfig(max_batch_tokens=40, max_batch_size=64, max_wait_ms=5000),
                       on_group=lambda n, _w: groups.append(n))
        q.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seqs = [list(range(1, 31)), list(range(1, 31))]  # 30 tokens each: two requests pass the 40-token budget
        first = asyncio.ensure_future(q.submit([seqs[0]]))
        second = asyncio.ensure_future(q.submit([seqs[1]]))
        await first
        took = loop.time() - t0
        assert not second.done()  # alone under the budget, it still waits for company
        await q.close()  # ... until close() drains it
        await second
        return took

    took = asyncio.run(main())
    assert took < 4.0  # the full budget released the first group without waiting for the 5 s deadline
    assert groups == [1, 1]  # the budget kept the two 30-token requests in separate groups


def test_queue_bound_refuses_with_429_and_close_drains(direct_embedder) -> None:
    async def main():
        q = BatchQueue(direct_embedder, BatchingConfig(max_queue_inputs=5, max_wait_ms=200))
        q.start()
        first = asyncio.ensure_future(q.submit(_seqs(direct_embedder, "a", 4)))
        await asyncio.sleep(0)  # let it enqueue
        assert q.depth == 4
        with pytest.raises(ApiError) as exc:
            await q.submit(_seqs(direct_embedder, "b", 2))
        assert exc.value.status == 429 and exc.value.code == "queue_full"
        await q.close()  # drains the queued request instead of dropping it
        out = await first
        with pytest.raises(ApiError) as closed:
            await q.submit(_seqs(direct_embedder, "c", 1))
        return out, closed.value.status

    out, closed_status = asyncio.run(main())
    assert out.shape[0] == 4 and closed_status == 503


def test_batching_config_rejects_nonsense() -> None:
    with pytest.raises(UserInputError):
        BatchingConfig(max_batch_tokens=0)
    with pytest.raises(UserInputError):
        BatchingConfig(max_wait_ms=-1)
