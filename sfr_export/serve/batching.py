"""Dynamic batching: concurrent requests are grouped up to a token budget or a wait deadline, run as one
``Embedder.encode_ids`` call in a worker thread, and each request gets its own rows back, in order.

One worker runs inference while the event loop keeps accepting and grouping the next requests. The queue is bounded
in inputs; a request that would overflow it now is refused at once (the server answers 429), so a flood costs no
memory. A request larger than the whole queue could never be taken: it gets 400, never 429.
``close()`` stops intake and drains what is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import SfrExportError, UserInputError
from ..runtime.embedder import BatchStats, Embedder
from .protocol import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_tokens: int = 8192  # real tokens grouped into one encode call (and padded tokens per runner call)
    max_batch_size: int = 64  # rows per runner call
    max_wait_ms: float = 5.0  # how long the first queued request waits for company
    max_queue_inputs: int = 2048  # inputs waiting (not yet running); beyond this requests get 429

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_batch_size < 1 or self.max_queue_inputs < 1:
            raise UserInputError("max_batch_tokens, max_batch_size and max_queue_inputs must be >= 1")
        if self.max_wait_ms < 0:
            raise UserInputError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass
class _Item:
    seqs: list[list[int]]
    tokens: int
    future: asyncio.Future
    enqueued: float


class BatchQueue:
    def __init__(self, embedder: Embedder, config: BatchingConfig, *,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_depth: Callable[[int], None] | None = None,
                 on_group: Callable[[int, float], None] | None = None):
        self.embedder = embedder
        self.config = config
        self._on_batch = on_batch
        self._on_depth = on_depth or (lambda _n: None)
        self._on_group = on_group or (lambda _n, _w: None)
        self._pending: deque[_Item] = deque()
        self._queued_inputs = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sfr-batch-worker")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def depth(self) -> int:
        return self._queued_inputs

    async def close(self) -> None:
        """Refuse new work, finish everything queued, stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task

    # ---- intake --------------------------------------------------------------------------------------------
    async def submit(self, seqs: list[list[int]]) -> np.ndarray:
        """Queue ``seqs``; returns their embeddings [len(seqs), dim] in order. Raises ApiError 429/503."""
        if self._closing or self._task is None or self._task.done():
            raise ApiError(503, "server is shutting down", type="server_error", code="unavailable")
        n = len(seqs)
        if n > self.config.max_queue_inputs:  # could never fit, even in an empty queue: not a "retry later"
            raise ApiError(400, f"'input' has {n} items, over the limit of {self.config.max_queue_inputs} per request "
                                "(the queue bound)", code="too_many_inputs")
        if self._queued_inputs + n > self.config.max_queue_inputs:
            raise ApiError(429, f"server queue is full ({self._queued_inputs} inputs waiting, bound "
                                f"{self.config.max_queue_inputs}); retry later", type="rate_limit_error",
                           param=None, code="queue_full")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(seqs, sum(len(s) for s in seqs), fut, time.perf_counter()))
        self._queued_inputs += n
        self._on_depth(self._queued_inputs)
        assert self._wakeup is not None
        self._wakeup.set()
        return await fut

    # ---- worker --------------------------------------------------------------------------------------------
    def _budget_full(self) -> bool:
        tokens = rows = 0
        for it in self._pending:
            tokens += it.tokens
            rows += len(it.seqs)
            if tokens >= self.config.max_batch_tokens or rows >= self.config.max_batch_size:
                return True
        return False

    def _take_group(self) -> list[_Item]:
        group: list[_Item] = []
        tokens = 0
        while self._pending:
            it = self._pending[0]
            if group and tokens + it.tokens > self.config.max_batch_tokens:
                break
            self._pending.popleft()
            self._queued_inputs -= len(it.seqs)
            if it.future.done():  # the client went away while queued
                continue
            group.append(it)
            tokens += it.tokens
        self._on_depth(self._queued_inputs)
        return group

    async def _run(self) -> None:
        assert self._wakeup is not None
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + max_wait
            while not self._closing and not self._budget_full():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            group = self._take_group()
            if group:
                await self._run_group(group)

    async def _run_group(self, group: list[_Item]) -> None:
        seqs = [s for it in group for s in it.seqs]
        now = time.perf_counter()
        self._on_group(len(seqs), max(now - it.enqueued for it in group))
        try:
            emb = await asyncio.to_thread(self.embedder.encode_ids, seqs, batch_size=self.config.max_batch_size,
                                          max_batch_tokens=self.config.max_batch_tokens, on_batch=self._on_batch,
                                          check=False)
        except SfrExportError as exc:
            err = ApiError(400, str(exc), code="invalid_input")
            self._fail(group, err)
            return
        except Exception as exc:  # noqa: BLE001 - a runner failure must reach every waiting request, not kill the worker
            log.exception("inference failed for a group of %d inputs", len(seqs))
            self._fail(group, ApiError(500, f"inference failed: {type(exc).__name__}: {exc}", type="server_error",
                                       param=None, code="inference_error"))
            return
        start = 0
        for it in group:
            n = len(it.seqs)
            if not it.future.done():
                it.future.set_result(emb[start:start + n])
            start += n

    @staticmethod
    def _fail(group: list[_Item], err: ApiError) -> None:
        for it in group:
            if not it.future.done():
                it.future.set_exception(err)
