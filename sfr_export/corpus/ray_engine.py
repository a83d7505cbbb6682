"""``--engine ray``: Ray Data schedules the units over an actor pool; each actor loads one ``Embedder`` once.

The dataset holds one row per pending unit (one block each), so a unit is the grain of retry: when an actor dies,
Ray restarts it (``max_restarts``) and re-runs its in-flight units (``max_task_retries``). Each unit's shard has a
fixed name and is written by rename, so a re-run unit replaces, never duplicates, its rows.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .._optional import require
from ..errors import SfrExportError
from .config import UnitResult
from .io import InputPlan, Unit
from .worker import CRASH_AFTER_ENV, CRASH_MARKER_ENV, EmbedderOptions, PromptOptions, UnitWorker

log = logging.getLogger(__name__)

MAX_RESTARTS = 4  # per actor
MAX_TASK_RETRIES = 4  # per unit, on actor death (not on errors raised by the unit: bad input stays an error)
RESULT_FIELDS = ("unit", "rows", "tokens", "seconds", "shard", "dim")


@dataclass(frozen=True)
class RayLayout:
    workers: int
    threads: int  # CPUs (and ORT intra-op threads) per actor
    gpus: int  # per actor: 0 or 1


class RayCluster:
    """Joins ``address`` or starts a local Ray sized to this machine; shuts down only what it started."""

    def __init__(self, address: str | None):
        self.ray = require("ray", purpose="--engine ray")
        require("ray.data", purpose="--engine ray")
        self.started = False
        if not self.ray.is_initialized():
            env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
            if address:
                self.ray.init(address=address, runtime_env=env, log_to_driver=False)
            else:
                self.ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env, log_to_driver=False)
            self.started = True

    def gpus(self) -> int:
        return int(self.ray.cluster_resources().get("GPU", 0))

    def layout(self, workers: int | None, threads: int | None) -> RayLayout:
        res = self.ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        if gpus:
            n = workers or gpus
            return RayLayout(n, threads or max(1, cpus // n), 1)
        n = workers or max(1, nodes)
        return RayLayout(n, threads or max(1, cpus // n), 0)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class _UnitActor:
    """A Ray Data callable class: one Embedder per actor, one unit per call."""

    def __init__(self, plan: InputPlan, embedder: EmbedderOptions, prompt: PromptOptions, out: str, dtype: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.worker = UnitWorker(embedder.open(), plan, prompt, Path(out), dtype)
        self.units = {u.index: u for u in plan.units}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {f: [] for f in RESULT_FIELDS + ("error", "message")}
        for u in batch["unit"]:
            try:
                r = self.worker.run(self.units[int(u)])
            except SfrExportError as exc:  # returned as data: Ray would keep only its own wrapper of the exception
                r = UnitResult(int(u), 0, 0, 0.0, "", 0)
                rows["error"].append(f"{type(exc).__module__}:{type(exc).__qualname__}")
                rows["message"].append(str(exc))
            else:
                rows["error"].append("")
                rows["message"].append("")
            for f in RESULT_FIELDS:
                rows[f].append(getattr(r, f))
        return {k: np.asarray(v) for k, v in rows.items()}


def run_ray(cluster: RayCluster, layout: RayLayout, plan: InputPlan, pending: Sequence[Unit], *,
            embedder: EmbedderOptions, prompt: PromptOptions, out: Path, dtype: str,
            on_unit: Callable[[UnitResult], None]) -> None:
    rd = require("ray.data", purpose="--engine ray")
    ctx = rd.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(layout.threads)}
    env.update({k: os.environ[k] for k in (CRASH_AFTER_ENV, CRASH_MARKER_ENV) if k in os.environ})
    ds = rd.from_items([{"unit": u.index} for u in pending], override_num_blocks=len(pending))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args but has no named parameter for the restart limits yet; without them
        # Ray Data restarts actors and retries their tasks forever (-1), which would loop on a unit that always kills.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        ds = ds.map_batches(
            _UnitActor, batch_size=1,
            compute=rd.ActorPoolStrategy(size=min(layout.workers, len(pending)), max_tasks_in_flight_per_actor=2),
            fn_constructor_kwargs={"plan": plan, "embedder": replace(embedder, threads=layout.threads),
                                   "prompt": prompt, "out": str(out), "dtype": dtype},
            num_cpus=layout.threads, num_gpus=layout.gpus, runtime_env={"env_vars": env},
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
    for row in ds.iter_rows():
        if row["error"]:
            raise _error_class(str(row["error"]))(str(row["message"]))
        on_unit(UnitResult(unit=int(row["unit"]), rows=int(row["rows"]), tokens=int(row["tokens"]),
                           seconds=float(row["seconds"]), shard=str(row["shard"]), dim=int(row["dim"])))


def _error_class(name: str) -> type[SfrExportError]:
    """The ``SfrExportError`` subclass an actor reported as ``module:qualname``."""
    import importlib

    module, _, qualname = name.partition(":")
    cls = getattr(importlib.import_module(module), qualname, None) if module.startswith("sfr_export.") else None
    return cls if isinstance(cls, type) and issubclass(cls, SfrExportError) else SfrExportError
