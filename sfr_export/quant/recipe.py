"""Task-mixed calibration recipes (TOML) and deterministic, length-targeted sampling.

A recipe names tasks (retrieval queries with their instruction, retrieval passages without it, STS, classification,
clustering texts), each with its share of the mix, its data file (JSONL with ``text``) and source; and a target
token-length distribution. ``sample_recipe`` draws calibration and held-out texts (disjoint), formatted with the
model's prompts, after the leakage guard has refused any fidelity-test text.
"""

from __future__ import annotations

import logging
import random
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalibrationError, UserInputError
from ..jsonl import iter_objects
from ..spec import ModelSpec, task_instructions
from .leakage import check_no_leakage
from .options import CalibrationMethod

log = logging.getLogger(__name__)

TASK_TYPES = ("retrieval_query", "retrieval_passage", "sts", "classification", "clustering")
_DEFAULT_INSTRUCTIONS = {"retrieval_query": "web_search", "sts": "STSBenchmark",
                         "classification": "Banking77Classification", "clustering": "ClusTREC-Covid"}


@dataclass(frozen=True)
class LengthBucket:
    max_tokens: int
    share: float


@dataclass(frozen=True)
class TaskEntry:
    type: str
    data: Path
    share: float
    task: str | None = None
    instruction: str | None = None
    source: str = ""

    def resolved_instruction(self) -> str | None:
        if self.type == "retrieval_passage":
            return None
        if self.instruction:
            return self.instruction
        name = self.task or _DEFAULT_INSTRUCTIONS[self.type]
        table = task_instructions()
        if name not in table:
            raise UserInputError(f"recipe task '{name}' is not in the instruction table (known: {', '.join(sorted(table))})")
        return table[name].instruction


@dataclass(frozen=True)
class Recipe:
    name: str
    tasks: tuple[TaskEntry, ...]
    lengths: tuple[LengthBucket, ...] = (LengthBucket(32, 0.4), LengthBucket(128, 0.3), LengthBucket(512, 0.3))
    samples: int = 128
    holdout: int = 32
    seed: int = 0
    holdout_pairs: Path | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UserInputError(f"recipe '{self.name}' is empty: it names no tasks")
        if self.samples < 1 or self.holdout < 1:
            raise UserInputError(f"recipe '{self.name}': samples and holdout must be >= 1 (got {self.samples}, {self.holdout})")
        if not self.lengths or any(b.max_tokens < 2 or b.share < 0 for b in self.lengths):
            raise UserInputError(f"recipe '{self.name}': length buckets need max_tokens >= 2 and share >= 0")
        if sorted(b.max_tokens for b in self.lengths) != [b.max_tokens for b in self.lengths]:
            raise UserInputError(f"recipe '{self.name}': length buckets must be in increasing max_tokens order")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path) if self.path else None, "samples": self.samples,
                "holdout": self.holdout, "seed": self.seed,
                "lengths": [{"max_tokens": b.max_tokens, "share": b.share} for b in self.lengths],
                "tasks": [{"type": t.type, "task": t.task, "share": t.share, "data": str(t.data), "source": t.source}
                          for t in self.tasks]}


@dataclass
class CalText:
    text: str  # formatted (prompt applied)
    raw: str
    type: str
    source: str
    tokens: int


@dataclass
class CalibrationSet:
    calibration: list[CalText]
    holdout: list[CalText]
    pairs: list[tuple[str, str, float]] = field(default_factory=list)  # held-out scored STS pairs (raw texts)

    def summary(self) -> dict[str, Any]:
        def dist(xs: list[CalText]) -> dict[str, Any]:
            return {"texts": len(xs), "by_type": dict(Counter(x.type for x in xs)),
                    "tokens_total": sum(x.tokens for x in xs),
                    "tokens_p50": sorted(x.tokens for x in xs)[len(xs) // 2] if xs else 0}
        return {"calibration": dist(self.calibration), "holdout": dist(self.holdout), "pairs": len(self.pairs)}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe name shipped in the package (``default``) or a TOML path."""
    from ..calibration import calibration_path

    p = Path(recipe)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise UserInputError(f"recipe file {p} does not exist")
        return p
    shipped = calibration_path(f"{recipe}.toml")
    if not shipped.is_file():
        raise UserInputError(f"unknown recipe '{recipe}': not a file and not a shipped recipe (shipped: default)")
    return shipped


def load_recipe(recipe: str | Path, *, samples: int | None = None, holdout: int | None = None,
                seed: int | None = None) -> Recipe:
    path = resolve_recipe_path(recipe)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserInputError(f"recipe {path} is not valid TOML: {exc}") from exc
    base = path.parent
    tasks = []
    for i, t in enumerate(raw.get("tasks", [])):
        if not isinstance(t, dict):
            raise UserInputError(f"recipe {path}: tasks[{i}] must be a table")
        unknown = set(t) - {"type", "data", "share", "task", "instruction", "source"}
        if unknown:
            raise UserInputError(f"recipe {path}: tasks[{i}] has unknown keys {sorted(unknown)}")
        ttype = t.get("type")
        if ttype not in TASK_TYPES:
            raise UserInputError(f"recipe {path}: tasks[{i}] has unknown task type {ttype!r} (expected one of {', '.join(TASK_TYPES)})")
        if "data" not in t:
            raise UserInputError(f"recipe {path}: tasks[{i}] names no data file")
        data = Path(t["data"]) if Path(t["data"]).is_absolute() else base / t["data"]
        if not data.is_file():
            raise UserInputError(f"recipe {path}: data file {data} of tasks[{i}] ({ttype}) does not exist")
        share = float(t.get("share", 1.0))
        if share <= 0:
            raise UserInputError(f"recipe {path}: tasks[{i}] share must be > 0, got {share}")
        tasks.append(TaskEntry(type=ttype, data=data, share=share, task=t.get("task"), instruction=t.get("instruction"),
                               source=str(t.get("source", data.name))))
    lengths = tuple(LengthBucket(int(b["max_tokens"]), float(b["share"])) for b in raw.get("lengths", [])) or Recipe.lengths
    pairs = raw.get("holdout_pairs")
    pairs_path = (base / pairs) if pairs else None
    if pairs_path is not None and not pairs_path.is_file():
        raise UserInputError(f"recipe {path}: holdout_pairs file {pairs_path} does not exist")
    return Recipe(name=str(raw.get("name", path.stem)), tasks=tuple(tasks), lengths=lengths,
                  samples=int(samples if samples is not None else raw.get("samples", 128)),
                  holdout=int(holdout if holdout is not None else raw.get("holdout", 32)),
                  seed=int(seed if seed is not None else raw.get("seed", 0)), holdout_pairs=pairs_path, path=path)


def recipe_from_jsonl(path: Path, *, samples: int = 128, holdout: int = 32, seed: int = 0) -> Recipe:
    """A recipe from the user's own JSONL (``text``, ``task`` = a task type, optional ``instruction``): one entry per
    (task, instruction), shares proportional to row counts."""
    rows = read_jsonl(Path(path))
    groups: Counter[tuple[str, str | None]] = Counter()
    for i, r in enumerate(rows):
        if r.get("task") not in TASK_TYPES:
            raise UserInputError(f"{path}: row {i + 1} has unknown task {r.get('task')!r} (expected one of {', '.join(TASK_TYPES)})")
        groups[(r["task"], r.get("instruction"))] += 1
    tasks = tuple(TaskEntry(type=t, data=Path(path), share=float(n), instruction=ins, source=f"{Path(path).name}:{t}")
                  for (t, ins), n in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")))
    return Recipe(name=Path(path).stem, tasks=tasks, samples=samples, holdout=holdout, seed=seed, path=Path(path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_no, r in iter_objects(path, UserInputError, "calibration data file"):
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            raise UserInputError(f"{path}:{line_no}: needs a non-empty string 'text'")
        rows.append(r)
    if not rows:
        raise UserInputError(f"calibration data file {path} has no rows")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------
def _format(entry: TaskEntry, text: str, spec: ModelSpec, instruction: str | None) -> str:
    if entry.type == "retrieval_passage" or not spec.uses_instructions or instruction is None:
        return spec.format_document(text)
    return spec.format_query(text, instruction)


def _bucket(n: int, lengths: tuple[LengthBucket, ...]) -> int:
    for i, b in enumerate(lengths):
        if n <= b.max_tokens:
            return i
    return len(lengths) - 1


def _entry_rows(recipe: Recipe) -> list[list[dict[str, Any]]]:
    """Each entry's rows; in a user JSONL an entry takes only the rows of its own task (and instruction)."""
    out: list[list[dict[str, Any]]] = []
    cache: dict[Path, list[dict[str, Any]]] = {}
    for t in recipe.tasks:
        rows = cache.setdefault(t.data, read_jsonl(t.data))
        if any("task" in r for r in rows) and any(r.get("task") == t.type for r in rows):
            rows = [r for r in rows if r.get("task") == t.type and (t.instruction is None or r.get("instruction") == t.instruction)]
        out.append(rows)
    return out


def _quotas(recipe: Recipe, total: int) -> list[int]:
    """Texts per entry by the largest-remainder method, so that they add up to exactly ``total``."""
    share_sum = sum(t.share for t in recipe.tasks)
    exact = [total * t.share / share_sum for t in recipe.tasks]
    quotas = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: -(exact[i] - quotas[i]))[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _pick_entry(recipe: Recipe, k: int, entry: Any, rows: list[dict[str, Any]], quota: int, tokenizer: Any,
                spec: ModelSpec) -> list[CalText]:
    """``quota`` texts of one entry, spread over the recipe's token-length buckets (seeded)."""
    rng = random.Random(recipe.seed * 1000003 + k)
    order = list(range(len(rows)))
    rng.shuffle(order)
    cand = [rows[i] for i in order[: max(4 * quota, quota + 16)]]
    default_ins = entry.resolved_instruction()
    texts = [_format(entry, r["text"], spec, r.get("instruction") or default_ins) for r in cand]
    lens = [len(s) for s in tokenizer.encode(texts).ids]
    buckets: list[list[int]] = [[] for _ in recipe.lengths]
    for i, n in enumerate(lens):
        buckets[_bucket(n, recipe.lengths)].append(i)
    bshare = sum(b.share for b in recipe.lengths) or 1.0
    chosen: list[int] = []
    for bi, b in enumerate(recipe.lengths):
        chosen += buckets[bi][: round(quota * b.share / bshare)]
    taken = set(chosen)
    leftovers = [i for bucket in buckets for i in bucket if i not in taken]
    chosen += leftovers[: max(0, quota - len(chosen))]  # a bucket this task cannot fill: take the nearest rest
    return [CalText(text=texts[i], raw=cand[i]["text"], type=entry.type, source=entry.source,
                    tokens=min(lens[i], spec.max_length)) for i in chosen[:quota]]


def sample_recipe(recipe: Recipe, tokenizer: Any, spec: ModelSpec, *,
                  method: CalibrationMethod = CalibrationMethod.MINMAX,
                  protected: frozenset[str] | None = None) -> CalibrationSet:
    """Draw ``samples`` calibration + ``holdout`` held-out texts, deterministic in ``recipe.seed``.

    ``tokenizer`` is a ``TextTokenizer`` (lengths are counted as the model sees them, prompt and EOS included).
    """
    method = CalibrationMethod.parse(method)
    need = method.min_samples
    if recipe.samples < need:
        raise CalibrationError(f"recipe '{recipe.name}' asks for {recipe.samples} calibration texts; method '{method}' needs at least {need}")
    rows_by_entry = _entry_rows(recipe)
    check_no_leakage(((str(t.data.name), r["text"]) for t, rows in zip(recipe.tasks, rows_by_entry) for r in rows), protected)
    quotas = _quotas(recipe, recipe.samples + recipe.holdout)
    picked: list[CalText] = []
    for k, (entry, rows) in enumerate(zip(recipe.tasks, rows_by_entry)):
        picked += _pick_entry(recipe, k, entry, rows, max(1, quotas[k]), tokenizer, spec)
    random.Random(recipe.seed).shuffle(picked)
    holdout, calib = picked[: recipe.holdout], picked[recipe.holdout: recipe.holdout + recipe.samples]
    if len(calib) < need:
        raise CalibrationError(f"recipe '{recipe.name}' yields only {len(calib)} calibration texts after the "
                               f"{recipe.holdout} held-out ones; method '{method}' needs at least {need}")
    if len(calib) < recipe.samples:
        log.warning("recipe '%s' yields %d calibration texts (asked %d): its data files are small", recipe.name,
                    len(calib), recipe.samples)
    pairs: list[tuple[str, str, float]] = []
    if recipe.holdout_pairs is not None:
        pairs = read_jsonl_pairs(recipe.holdout_pairs)
        check_no_leakage(((recipe.holdout_pairs.name, t) for a, b, _ in pairs for t in (a, b)), protected)
        drawn = {c.raw for c in picked}  # a pair holding a text this build calibrated or held out is not held out
        pairs = [p for p in pairs if p[0] not in drawn and p[1] not in drawn]
    return CalibrationSet(calibration=calib, holdout=holdout, pairs=pairs)


def read_jsonl_pairs(path: Path) -> list[tuple[str, str, float]]:
    out = []
    for line_no, r in iter_objects(path, UserInputError, "calibration pairs file"):
        try:
            out.append((str(r["text1"]), str(r["text2"]), float(r["score"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"{path}:{line_no}: needs text1, text2 and a numeric score") from exc
    return out
