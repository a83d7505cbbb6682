"""Fidelity gate: per-precision thresholds on embedding cosine and per-task score deltas.

A candidate passes when its mean and 1st-percentile cosine to the reference are at least ``min_mean_cosine`` and
``min_p1_cosine`` and, on every task, ``|candidate - reference|`` main score is at most ``max_delta`` points
(``task_max_delta`` overrides it per task). Defaults depend on the candidate's precision; a config file
(``[thresholds.<precision>]``) or the command line override them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import UserInputError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Thresholds:
    min_mean_cosine: float
    min_p1_cosine: float
    max_delta: float  # main-score points (x100), per task
    task_max_delta: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_cosine("min_mean_cosine", self.min_mean_cosine)
        check_cosine("min_p1_cosine", self.min_p1_cosine)
        check_delta("max_delta", self.max_delta)
        for task, v in self.task_max_delta.items():
            check_delta(f"task_max_delta.{task}", v)

    def delta_for(self, task: str) -> float:
        return self.task_max_delta.get(task, self.max_delta)

    def to_dict(self) -> dict[str, Any]:
        return {"min_mean_cosine": self.min_mean_cosine, "min_p1_cosine": self.min_p1_cosine,
                "max_delta": self.max_delta, "task_max_delta": dict(self.task_max_delta)}


def check_cosine(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not -1.0 <= value <= 1.0:
        raise UserInputError(f"{name} must be a cosine in [-1, 1], got {value!r}")
    return float(value)


def check_delta(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0.0 <= value <= 100.0:
        raise UserInputError(f"{name} must be a score difference in points within [0, 100], got {value!r}")
    return float(value)


# Defaults per precision. fp32 must be numerically the same model; fp16 loses ~3 decimal digits; int8 Q/DQ costs
# about 1% cosine on SFR-class models and may move a task by a point or two.
DEFAULT_THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(min_mean_cosine=0.9999, min_p1_cosine=0.999, max_delta=0.5),
    "fp16": Thresholds(min_mean_cosine=0.999, min_p1_cosine=0.995, max_delta=1.0),
    "int8": Thresholds(min_mean_cosine=0.98, min_p1_cosine=0.95, max_delta=2.0),
}


@dataclass(frozen=True)
class ThresholdOverrides:
    """Command-line overrides, applied on top of the per-precision table for every candidate."""

    min_mean_cosine: float | None = None
    min_p1_cosine: float | None = None
    max_delta: float | None = None

    def __post_init__(self) -> None:
        if self.min_mean_cosine is not None:
            check_cosine("--min-mean-cosine", self.min_mean_cosine)
        if self.min_p1_cosine is not None:
            check_cosine("--min-p1-cosine", self.min_p1_cosine)
        if self.max_delta is not None:
            check_delta("--max-delta", self.max_delta)

    def apply(self, t: Thresholds) -> Thresholds:
        changes = {k: v for k, v in self.__dict__.items() if v is not None}
        return replace(t, **changes) if changes else t


def precision_of(name: str) -> str:
    """fp32 | fp16 | int8 for a candidate name such as ``fp16``, ``int8-cpu`` or ``tensorrt-fp16``."""
    n = name.lower()
    if "int8" in n or "fp8" in n or "int4" in n:
        return "int8"
    if "16" in n or "half" in n:  # fp16, bf16, float16, bfloat16
        return "fp16"
    return "fp32"


def thresholds_from_table(table: dict[str, Any], where: str) -> dict[str, Thresholds]:
    """``[thresholds.fp16] min_mean_cosine = ...`` (+ ``[thresholds.fp16.task_max_delta] STS13 = 1.5``)."""
    out = dict(DEFAULT_THRESHOLDS)
    for prec, values in table.items():
        if prec not in PRECISIONS:
            raise UserInputError(f"{where}: table thresholds.{prec} is not a precision ({', '.join(PRECISIONS)})")
        if not isinstance(values, dict):
            raise UserInputError(f"{where}: thresholds.{prec} must be a table")
        allowed = {"min_mean_cosine", "min_p1_cosine", "max_delta", "task_max_delta"}
        unknown = set(values) - allowed
        if unknown:
            raise UserInputError(f"{where}: table thresholds.{prec} has unknown keys {sorted(unknown)}")
        base = out[prec]
        tmd = values.get("task_max_delta", base.task_max_delta)
        if not isinstance(tmd, dict):
            raise UserInputError(f"{where}: task_max_delta must be a table of task = points")
        out[prec] = Thresholds(min_mean_cosine=values.get("min_mean_cosine", base.min_mean_cosine),
                               min_p1_cosine=values.get("min_p1_cosine", base.min_p1_cosine),
                               max_delta=values.get("max_delta", base.max_delta),
                               task_max_delta={str(k): float(v) for k, v in tmd.items()})
    return out


@dataclass
class Failure:
    candidate: str
    task: str | None  # None: an embedding-level (all tasks) threshold
    what: str
    value: float
    limit: float
    severity: float  # how far past the limit, relative to it (to name the worst)

    def line(self) -> str:
        where = f"{self.candidate} on {self.task}" if self.task else self.candidate
        return f"{where}: {self.what} {self.value:.5g} (limit {self.limit:.5g})"


def check_candidate(name: str, cosine: dict[str, Any], task_cosine: dict[str, dict[str, float]],
                    deltas: dict[str, float], t: Thresholds) -> list[Failure]:
    """Every threshold ``name`` fails; cosine failures name the task with the lowest mean cosine."""
    fails: list[Failure] = []
    worst_task = min(task_cosine, key=lambda k: task_cosine[k]["mean"]) if task_cosine else None
    if cosine["mean"] < t.min_mean_cosine:
        fails.append(Failure(name, worst_task, "mean cosine", cosine["mean"], t.min_mean_cosine,
                             (t.min_mean_cosine - cosine["mean"]) / max(1 - t.min_mean_cosine, 1e-6)))
    if cosine["p1"] < t.min_p1_cosine:
        fails.append(Failure(name, worst_task, "p1 cosine", cosine["p1"], t.min_p1_cosine,
                             (t.min_p1_cosine - cosine["p1"]) / max(1 - t.min_p1_cosine, 1e-6)))
    for task, d in deltas.items():
        limit = t.delta_for(task)
        if abs(d) > limit:
            fails.append(Failure(name, task, "|score delta| (points)", abs(d), limit, (abs(d) - limit) / max(limit, 1e-6)))
    return fails


def gate_reason(failures: list[Failure], evaluated: int, skipped: list[tuple[str, str]]) -> str | None:
    """One line naming the worst task and candidate, or None when the gate passes."""
    if failures:
        worst = max(failures, key=lambda f: f.severity)
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        return f"fidelity gate failed: {worst.line()}{more}"
    if evaluated == 0:
        why = "; ".join(f"{n}: {r}" for n, r in skipped) or "no candidates"
        return f"fidelity gate failed: no candidate could be evaluated ({why})"
    return None
