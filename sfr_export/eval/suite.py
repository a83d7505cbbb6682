"""Verification suites: which tasks, from which data folder, with which deterministic limits (TOML files).

``quick`` (``suites/quick.toml``) reads the small license-compatible subsets shipped in the package
(``eval/data/``, see its SOURCE.md), so ``sfr-export verify`` works offline right after ``pip install``; ``full``
(``suites/full.toml``) reads every MTEB task folder of ``../shared/data`` (or ``--data-dir``). A suite may also be
the path of a user TOML file of the same shape.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import task_instructions
from .clustering import ClusteringProtocol
from .loaders import DEFAULT_FORMATS, LOADERS, Limits, load_task
from .tasks import EvalDataError, Task, check_task_type

SUITES_DIR = Path(__file__).parent / "suites"
PACKAGE_DATA_DIR = Path(__file__).parent / "data"
DATA_ENV = "SFR_EXPORT_DATA_DIR"
_LIMIT_KEYS = set(Limits.__dataclass_fields__)
_ENTRY_KEYS = {"name", "type", "format", "folder", "instruction", "clustering_max_fraction"} | _LIMIT_KEYS


def default_data_dir() -> Path:
    """``$SFR_EXPORT_DATA_DIR``, else ``../shared/data`` beside the project root (where CI keeps it)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass(frozen=True)
class TaskEntry:
    name: str
    type: str
    format: str
    folder: str
    limits: Limits = field(default_factory=Limits)
    instruction: str | None = None  # for tasks outside resources/instructions.toml
    clustering: ClusteringProtocol = field(default_factory=ClusteringProtocol)

    @property
    def prompt(self) -> str | None:
        """The instruction-table task name Embedder.tokenize(prompt=...) uses, when there is no own instruction."""
        return None if self.instruction is not None else self.name


@dataclass(frozen=True)
class Suite:
    name: str
    data_root: str  # "package" | "shared"
    tasks: tuple[TaskEntry, ...]

    def data_dir(self, override: Path | None = None) -> Path:
        if override is not None:
            d = Path(override)
        elif self.data_root == "package":
            d = PACKAGE_DATA_DIR
        else:
            d = default_data_dir()
        if not d.is_dir():
            raise EvalDataError(f"data dir {d} does not exist: pass --data-dir or set {DATA_ENV}")
        return d

    def load(self, data_dir: Path | None = None) -> list[tuple[TaskEntry, Task]]:
        root = self.data_dir(data_dir)
        return [(e, load_task(root / e.folder, e.name, e.format, e.limits)) for e in self.tasks]


def _entry(raw: dict[str, Any], where: str) -> TaskEntry:
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise EvalDataError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise EvalDataError(f"{where}: every task needs a name")
    known = task_instructions().get(name)
    task_type = raw.get("type") or (known.type if known else None)
    if task_type is None:
        raise EvalDataError(f"{where}: task {name} is not in the instruction table; give its type")
    check_task_type(str(task_type), where=f"{where} (task {name})")
    fmt = raw.get("format") or DEFAULT_FORMATS.get(name)
    if fmt is None or fmt not in LOADERS:
        raise EvalDataError(f"{where}: task {name} needs a known format (one of {', '.join(sorted(LOADERS))})")
    instruction = raw.get("instruction")
    if known is None and instruction is None:
        raise EvalDataError(f"{where}: task {name} is not in the instruction table; give its instruction")
    frac = raw.get("clustering_max_fraction")
    if frac is not None and not 0 < float(frac) <= 1:
        raise EvalDataError(f"{where}: clustering_max_fraction must be in (0, 1], got {frac}")
    return TaskEntry(name=name, type=str(task_type), format=fmt, folder=str(raw.get("folder") or name),
                     limits=Limits(**{k: raw[k] for k in _LIMIT_KEYS if k in raw}), instruction=instruction,
                     clustering=ClusteringProtocol(max_fraction=float(frac) if frac is not None else None))


def parse_suite(data: dict[str, Any], where: str) -> Suite:
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise EvalDataError(f"suite {where} lists no tasks (an empty suite verifies nothing)")
    root = data.get("data", "shared")
    if root not in ("package", "shared"):
        raise EvalDataError(f"suite {where}: data must be 'package' or 'shared', got {root!r}")
    entries = tuple(_entry(t, f"suite {where}, task {i + 1}") for i, t in enumerate(tasks))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise EvalDataError(f"suite {where} lists a task twice: {names}")
    return Suite(name=str(data.get("name", where)), data_root=root, tasks=entries)


def load_suite(suite: str | Path) -> Suite:
    """``quick``, ``full``, or the path of a suite TOML file."""
    path = SUITES_DIR / f"{suite}.toml" if str(suite) in ("quick", "full") else Path(suite)
    if not path.is_file():
        raise EvalDataError(f"unknown suite '{suite}': expected quick, full or a suite TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise EvalDataError(f"suite file {path} is not valid TOML: {exc}") from exc
    return parse_suite(data, str(suite))
