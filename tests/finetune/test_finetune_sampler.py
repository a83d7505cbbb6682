"""The task-homogeneous sampler, tested as a property over many seeded random configurations."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sfr_export.errors import TrainingError
from sfr_export.finetune.sampler import TaskBatchSampler


def _random_config(rng: random.Random):
    n_tasks = rng.randint(1, 5)
    tasks, start = {}, 0
    for t in range(n_tasks):
        size = rng.randint(1, 40)
        tasks[f"task{t}"] = list(range(start, start + size))
        start += size
    batch = rng.randint(1, min(len(v) for v in tasks.values()))
    weights = {t: rng.choice([0.5, 1.0, 3.0]) for t in tasks if rng.random() < 0.5}
    return tasks, batch, weights, rng.randint(0, 10_000)


def test_homogeneous_batches_property():
    rng = random.Random(1234)
    for _ in range(150):
        tasks, batch, weights, seed = _random_config(rng)
        owner = {i: t for t, idx in tasks.items() for i in idx}
        a = TaskBatchSampler(tasks, batch, weights=weights, seed=seed)
        b = TaskBatchSampler(tasks, batch, weights=weights, seed=seed)
        steps = rng.randint(1, 60)
        cut = rng.randint(0, steps)
        seen_a = [a.next_batch() for _ in range(cut)]
        state = a.state_dict()
        seen_a += [a.next_batch() for _ in range(steps - cut)]
        # deterministic given the seed
        assert seen_a == [b.next_batch() for _ in range(steps)]
        # resumable: a fresh sampler loaded with the state at `cut` continues identically
        c = TaskBatchSampler(tasks, batch, weights=weights, seed=seed)
        c.load_state_dict(state)
        assert [c.next_batch() for _ in range(steps - cut)] == seen_a[cut:]
        per_task_epoch: dict[tuple[str, int], set[int]] = {}
        for s in seen_a:
            # one task per batch, the batch's rows all belong to it, no repeats inside a batch
            assert s.task in tasks
            assert len(s.indices) == batch
            assert {owner[i] for i in s.indices} == {s.task}
            assert len(set(s.indices)) == batch
        # within an epoch a task never repeats an example: replay cursors to check
        d = TaskBatchSampler(tasks, batch, weights=weights, seed=seed)
        for s in seen_a:
            d.next_batch()
            epoch = d.streams[s.task].epoch
            key = (s.task, epoch)
            seen = per_task_epoch.setdefault(key, set())
            assert not seen & set(s.indices)
            seen |= set(s.indices)


def test_weights_mix_tasks_across_batches():
    tasks = {"a": list(range(0, 50)), "b": list(range(50, 100)), "c": list(range(100, 110))}
    s = TaskBatchSampler(tasks, 4, weights={"a": 3.0, "b": 1.0, "c": 0.0}, seed=7)
    counts = Counter(s.next_batch().task for _ in range(4000))
    assert counts["c"] == 0
    assert 2.6 < counts["a"] / counts["b"] < 3.4
    # default weights: proportional to task size
    s = TaskBatchSampler({"a": list(range(30)), "b": list(range(30, 40))}, 2, seed=3)
    counts = Counter(s.next_batch().task for _ in range(4000))
    assert 2.6 < counts["a"] / counts["b"] < 3.4


def test_mixed_mode_draws_each_row_independently():
    tasks = {"a": list(range(0, 50)), "b": list(range(50, 100))}
    s = TaskBatchSampler(tasks, 8, seed=0, homogeneous=False)
    batches = [s.next_batch() for _ in range(200)]
    assert all(b.task is None for b in batches)
    assert any(len({i < 50 for i in b.indices}) == 2 for b in batches)


@pytest.mark.parametrize("tasks,batch,weights,match", [
    ({"a": list(range(3))}, 4, None, "larger than task 'a'"),
    ({"a": []}, 1, None, "task 'a' has no examples"),
    ({}, 1, None, "no tasks"),
    ({"a": [0, 1]}, 1, {"zzz": 1.0}, "unknown task"),
    ({"a": [0, 1]}, 1, {"a": 0.0}, "at least one task"),
    ({"a": [0, 1]}, 0, None, "batch_size must be >= 1"),
])
def test_bad_sampler_inputs(tasks, batch, weights, match):
    with pytest.raises(TrainingError, match=match):
        TaskBatchSampler(tasks, batch, weights=weights)


def test_resume_refuses_a_different_sampler():
    s = TaskBatchSampler({"a": list(range(10))}, 2, seed=1)
    s.next_batch()
    other = TaskBatchSampler({"a": list(range(10))}, 2, seed=2)
    with pytest.raises(TrainingError, match="seed"):
        other.load_state_dict(s.state_dict())
