"""Task-homogeneous batch sampler: every batch comes from one task, tasks mixed across batches by weight.

Deterministic given the seed: the task of step ``s`` is drawn from an RNG seeded with ``(seed, s)``, and each task
walks its own per-epoch permutation (seeded with ``(seed, task, epoch)``), so the state is just the step number and
one (epoch, position) cursor per task: ``state_dict()`` / ``load_state_dict()`` resume exactly.

In homogeneous mode a batch never holds the same example twice: when fewer than ``batch_size`` examples are left in
a task's epoch, the rest is skipped and the next epoch starts. ``homogeneous=False`` (mixed batching, for the
comparison) draws each example's task independently with the same weights.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TrainingError


@dataclass(frozen=True)
class SampledBatch:
    step: int
    task: str | None  # None for a mixed batch
    indices: tuple[int, ...]


class _TaskStream:
    """One task's examples as an endless sequence of seeded per-epoch permutations."""

    def __init__(self, task: str, indices: Sequence[int], seed: int):
        self.task = task
        self.indices = list(indices)
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(self.indices)
        random.Random(f"{self.seed}:{self.task}:{epoch}").shuffle(order)
        return order

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.pos = 0
        self._order = self._permutation(self.epoch)

    def take(self, n: int) -> list[int]:
        """``n`` distinct examples from the current epoch (moving to the next epoch if too few are left)."""
        if len(self._order) - self.pos < n:
            self._next_epoch()
        out = self._order[self.pos:self.pos + n]
        self.pos += n
        return out

    def state(self) -> list[int]:
        return [self.epoch, self.pos]

    def restore(self, epoch: int, pos: int) -> None:
        if not 0 <= pos <= len(self.indices) or epoch < 0:
            raise TrainingError(f"sampler state for task '{self.task}' is out of range (epoch {epoch}, position {pos})")
        self.epoch, self.pos = epoch, pos
        self._order = self._permutation(epoch)


class TaskBatchSampler:
    def __init__(self, task_indices: Mapping[str, Sequence[int]], batch_size: int, *,
                 weights: Mapping[str, float] | None = None, seed: int = 0, homogeneous: bool = True):
        if batch_size < 1:
            raise TrainingError(f"batch_size must be >= 1, got {batch_size}")
        if not task_indices:
            raise TrainingError("no tasks to sample from")
        for task, idx in task_indices.items():
            if len(idx) == 0:
                raise TrainingError(f"task '{task}' has no examples")
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(task_indices))
        if unknown:
            raise TrainingError(f"sampler weights name unknown task(s): {', '.join(unknown)}")
        self.tasks = list(task_indices)
        self.weights = [float(weights.get(t, len(task_indices[t]))) for t in self.tasks]
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise TrainingError("sampler weights must be >= 0 with at least one task above 0")
        if homogeneous:
            for t, w in zip(self.tasks, self.weights):
                if w > 0 and len(task_indices[t]) < batch_size:
                    raise TrainingError(f"batch size {batch_size} is larger than task '{t}' "
                                        f"({len(task_indices[t])} examples): lower sampler.batch_size or add data")
        self.batch_size = batch_size
        self.seed = seed
        self.homogeneous = homogeneous
        self.streams = {t: _TaskStream(t, task_indices[t], seed) for t in self.tasks}
        self.step = 0

    def _rng(self) -> random.Random:
        return random.Random(f"{self.seed}:step:{self.step}")

    def next_batch(self) -> SampledBatch:
        rng = self._rng()
        if self.homogeneous:
            task = rng.choices(self.tasks, weights=self.weights)[0]
            batch = SampledBatch(self.step, task, tuple(self.streams[task].take(self.batch_size)))
        else:
            picks = rng.choices(self.tasks, weights=self.weights, k=self.batch_size)
            batch = SampledBatch(self.step, None, tuple(self.streams[t].take(1)[0] for t in picks))
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[SampledBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "homogeneous": self.homogeneous, "batch_size": self.batch_size,
                "tasks": {t: len(self.streams[t].indices) for t in self.tasks},
                "cursors": {t: s.state() for t, s in self.streams.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "homogeneous", "batch_size", "tasks"):
            if state.get(key) != mine[key]:
                raise TrainingError(f"cannot resume the sampler: its {key} was {state.get(key)!r}, now {mine[key]!r}")
        self.step = int(state["step"])
        for t, (epoch, pos) in state["cursors"].items():
            self.streams[t].restore(int(epoch), int(pos))
