"""One typed TOML config for ``sfr-export finetune --config FILE`` (and ``sfr-export mine``).

Every key has a documented default; unknown keys and wrong types are errors. Relative paths are resolved against
the config file's directory. Example::

    [model]
    base = "demo:smollm2"            # hub id, local dir or demo:NAME

    [data]
    train = ["train.jsonl"]
    on_bad_line = "stop"             # or "skip" (each bad line is logged with its number)

    [sampler]
    batch_size = 8                   # global batch (split across processes under torchrun)
    homogeneous = true               # every batch from one task (the SFR recipe); false = mixed batches
    weights = { STSBenchmark = 2.0 } # task -> weight; tasks not named get weight by size (see below)

    [loss]
    temperature = 0.02
    hard_negatives = 7

    [train]
    output = "out/ft"
    steps = 1000

The recipe's unpublished choices (temperature, teacher, negative rank window) have defaults here, chosen as
follows: temperature 0.02 (e5-mistral's published value, SFR's starting point); the teacher defaults to the base
model being tuned; negatives are sampled from teacher ranks 30-100 and any candidate scoring above 0.95 x the
positive's score is dropped as a likely false negative (the "TopK-PercPos" rule of NV-Retriever).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from .data import ON_BAD_LINE, TASK_TYPES

# The recipe: no in-batch negatives for clustering and classification (label documents are shared by many rows).
DEFAULT_IN_BATCH = {"retrieval": True, "sts": True, "classification": False, "clustering": False}


@dataclass(frozen=True)
class ModelSection:
    base: str = "Salesforce/SFR-Embedding-Mistral"  # hub id, local dir or demo:NAME
    revision: str = ""  # hub revision ("" = default branch)
    dtype: str = "float32"  # weights while training: float32 | bfloat16 (the merged model is saved in this dtype)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainingError(f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class DataSection:
    train: tuple[Path, ...] = ()  # JSONL files in the fine-tuning format
    on_bad_line: str = "stop"  # stop | skip
    max_query_length: int = 128  # tokens, EOS included (the spec's max_length is the upper bound)
    max_doc_length: int = 256

    def __post_init__(self) -> None:
        if self.on_bad_line not in ON_BAD_LINE:
            raise TrainingError(f"data.on_bad_line must be 'stop' or 'skip', got {self.on_bad_line!r}")
        if self.max_query_length < 2 or self.max_doc_length < 2:
            raise TrainingError("data.max_query_length and data.max_doc_length must be >= 2")


@dataclass(frozen=True)
class SamplerConfig:
    batch_size: int = 32  # examples per optimizer micro-step, over all processes
    homogeneous: bool = True  # one task per batch (SFR); false: each example's task drawn independently (mixed)
    weights: dict[str, float] = field(default_factory=dict)  # task -> weight; unnamed tasks get their size
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TrainingError(f"sampler.batch_size must be >= 1, got {self.batch_size}")
        for task, w in self.weights.items():
            if not w >= 0:
                raise TrainingError(f"sampler.weights[{task!r}] must be >= 0, got {w}")


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.02
    hard_negatives: int = 7  # k per example (SFR used 7); examples with fewer use what they have
    in_batch: dict[str, bool] = field(default_factory=lambda: dict(DEFAULT_IN_BATCH))  # per task type
    gradcache_chunk: int = 0  # > 0: GradCache with sub-batches of this many texts; 0: off

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise TrainingError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.hard_negatives < 0 or self.gradcache_chunk < 0:
            raise TrainingError("loss.hard_negatives and loss.gradcache_chunk must be >= 0")
        for t in self.in_batch:
            if t not in TASK_TYPES:
                raise TrainingError(f"loss.in_batch names unknown task type {t!r} (expected {', '.join(TASK_TYPES)})")
        object.__setattr__(self, "in_batch", {**DEFAULT_IN_BATCH, **self.in_batch})


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0  # 0 keeps GradCache's two forward passes identical without RNG replay
    target_modules: tuple[str, ...] = ("all-linear",)  # "all-linear" or module names (q_proj, v_proj, ...)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha < 1 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise TrainingError("lora: rank and alpha must be >= 1, dropout in [0, 1), target_modules non-empty")


@dataclass(frozen=True)
class TrainSettings:
    output: Path = Path("out/finetune")
    steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-5
    warmup_steps: int = 100  # linear warmup, then linear decay to 0 at `steps`
    weight_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    gradient_checkpointing: bool = True
    bf16: str = "auto"  # auto (on CUDA with bf16 support) | on | off
    save_every: int = 200  # optimizer steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output/checkpoints
    log_every: int = 10
    fsdp: bool = False  # under torchrun: FSDP instead of DDP
    merge: bool = True  # also write the merged model dir
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum < 1 or self.warmup_steps < 0 or self.save_every < 0:
            raise TrainingError("train: steps and grad_accum must be >= 1; warmup_steps and save_every >= 0")
        if not self.learning_rate > 0:
            raise TrainingError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if self.bf16 not in ("auto", "on", "off"):
            raise TrainingError(f"train.bf16 must be auto, on or off, got {self.bf16!r}")
        if self.keep_checkpoints < 1 or self.log_every < 1:
            raise TrainingError("train.keep_checkpoints and train.log_every must be >= 1")


@dataclass(frozen=True)
class MiningConfig:
    teacher: str = ""  # model (hub id, dir, demo:NAME) or an sfr-export artifact dir; "" = the base model
    backend: str = "auto"  # for an artifact teacher: auto | onnxruntime | torch | tensorrt
    rank_window: tuple[int, int] = (30, 100)  # sample negatives among teacher ranks [start, end) (0-based)
    negatives: int = 7
    false_negative_ratio: float = 0.95  # drop candidates scoring > ratio x the positive's score
    batch_size: int = 32
    max_length: int = 256  # teacher tokens per text
    types: tuple[str, ...] = ("retrieval", "sts")  # task types to mine; others keep their (label) negatives
    seed: int = 0

    def __post_init__(self) -> None:
        for t in self.types:
            if t not in TASK_TYPES:
                raise TrainingError(f"mining.types names unknown task type {t!r} (expected {', '.join(TASK_TYPES)})")
        lo, hi = self.rank_window
        if not 0 <= lo < hi:
            raise TrainingError(f"mining.rank_window must satisfy 0 <= start < end, got {self.rank_window}")
        if self.negatives < 1 or self.batch_size < 1 or self.max_length < 2:
            raise TrainingError("mining: negatives and batch_size must be >= 1, max_length >= 2")
        if not 0 < self.false_negative_ratio <= 1.5:
            raise TrainingError(f"mining.false_negative_ratio must be in (0, 1.5], got {self.false_negative_ratio}")


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    mining: MiningConfig = field(default_factory=MiningConfig)

    @classmethod
    def from_toml(cls, path: Path) -> "FinetuneConfig":
        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise TrainingError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base_dir: Path = Path(".")) -> "FinetuneConfig":
        return _build(cls, raw, "config", Path(base_dir))

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def _build(cls: type, raw: Any, where: str, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise TrainingError(f"{where} must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise TrainingError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}", base_dir) for k, v in raw.items()}
    return cls(**kwargs)


def _convert(tp: Any, v: Any, where: str, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where, base_dir)
    if tp is Path:
        if not isinstance(v, str):
            raise TrainingError(f"{where} must be a path string")
        p = Path(v).expanduser()
        return p if p.is_absolute() else base_dir / p
    if tp is bool:
        if not isinstance(v, bool):
            raise TrainingError(f"{where} must be true or false")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TrainingError(f"{where} must be an integer")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TrainingError(f"{where} must be a number")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise TrainingError(f"{where} must be a string")
        return v
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(v, str) and args[-1] is Ellipsis:
            v = [v]
        if not isinstance(v, list):
            raise TrainingError(f"{where} must be a list")
        if args[-1] is Ellipsis:
            return tuple(_convert(args[0], x, f"{where}[{i}]", base_dir) for i, x in enumerate(v))
        if len(v) != len(args):
            raise TrainingError(f"{where} must have {len(args)} items")
        return tuple(_convert(a, x, f"{where}[{i}]", base_dir) for i, (a, x) in enumerate(zip(args, v)))
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(v, dict):
            raise TrainingError(f"{where} must be a table")
        return {str(k): _convert(vt, x, f"{where}.{k}", base_dir) for k, x in v.items()}
    if origin in (typing.Union, types.UnionType):
        raise TrainingError(f"{where}: union types are not supported in the config")  # pragma: no cover
    raise TrainingError(f"{where}: unsupported config type {tp!r}")  # pragma: no cover
