"""The score of one task for one backend (every evaluator returns a ``TaskScore``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskScore:
    task: str
    type: str
    main_metric: str
    main: float  # in points (x100), as on the MTEB leaderboard
    metrics: dict[str, float] = field(default_factory=dict)
    # Retrieval only: query id -> the top-10 document ids, for the reference-vs-candidate ranking overlap.
    rankings: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"main_metric": self.main_metric, "main": self.main, "metrics": dict(self.metrics)}
