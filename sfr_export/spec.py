"""ModelSpec: how a backbone becomes an embedder (pooling, normalisation, EOS, prompts, max length).

The spec is read from a sentence-transformers layout when present (``modules.json``, ``1_Pooling/config.json``,
``config_sentence_transformers.json``, ``sentence_bert_config.json``), otherwise from a table of known models, and
is stored as ``spec.json`` in every artifact directory, so the runtime never guesses.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .choice import Choice
from .errors import UserInputError

E5_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {text}"
PLAIN_TEMPLATE = "{text}"


class PoolingMode(Choice, label="pooling mode", aliases={"last_token": "lasttoken", "last": "lasttoken",
                                                       "eos": "lasttoken", "mean_tokens": "mean", "cls_token": "cls"}):
    LASTTOKEN = "lasttoken"
    MEAN = "mean"
    CLS = "cls"


@dataclass(frozen=True)
class TaskInstruction:
    name: str
    type: str
    instruction: str
    symmetric: bool


@lru_cache(maxsize=1)
def task_instructions() -> dict[str, TaskInstruction]:
    """The one table of task instructions (``resources/instructions.toml``)."""
    from .resources import resource_path

    data = tomllib.loads(resource_path("instructions.toml").read_text(encoding="utf-8"))
    return {
        name: TaskInstruction(name=name, type=t["type"], instruction=t["instruction"], symmetric=bool(t["symmetric"]))
        for name, t in data["tasks"].items()
    }


@dataclass(frozen=True)
class ModelSpec:
    pooling: PoolingMode = PoolingMode.LASTTOKEN
    normalize: bool = True
    append_eos: bool = True
    # Prepend BOS ourselves when the tokenizer config asks for it (transformers 5 TokenizersBackend ignores add_bos_token).
    prepend_bos: bool = False
    max_length: int = 512
    # For instruction models: queries are formatted with query_template; documents with document_template.
    query_template: str = E5_QUERY_TEMPLATE
    document_template: str = PLAIN_TEMPLATE
    # Named prompt prefixes (sentence-transformers ``prompts``), e.g. {"query": "..."}.
    prompts: dict[str, str] = field(default_factory=dict)
    padding_side: str = "right"
    uses_instructions: bool = True
    # The padding side the exported graph is exact for: "any" (it masks padding) or "right" (causal graph without a
    # padding mask). Written by the export; runtimes re-pad other batches. "any" keeps older artifacts loading.
    graph_padding: str = "any"

    def __post_init__(self) -> None:
        if not isinstance(self.pooling, PoolingMode):
            object.__setattr__(self, "pooling", PoolingMode.parse(str(self.pooling)))
        if self.max_length < 2:
            raise UserInputError(f"max_length must be >= 2, got {self.max_length}")
        if self.padding_side not in ("left", "right"):
            raise UserInputError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.graph_padding not in ("any", "right"):
            raise UserInputError(f"graph_padding must be 'any' or 'right', got {self.graph_padding!r}")
        if "{text}" not in self.query_template or "{text}" not in self.document_template:
            raise UserInputError("prompt templates must contain '{text}'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pooling"] = self.pooling.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserInputError(f"spec has unknown keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    # ---- prompts -------------------------------------------------------------------------------------------
    def format_query(self, text: str, instruction: str) -> str:
        return self.query_template.format(instruction=instruction, text=text)

    def format_document(self, text: str) -> str:
        return self.document_template.format(text=text)

    def apply_prompt(self, texts: list[str], prompt: str | None = None, *, instruction: str | None = None,
                     side: str = "query") -> list[str]:
        """Format ``texts`` for ``prompt``.

        ``prompt`` may name a sentence-transformers prompt in ``self.prompts`` (used as a prefix) or a task in the
        instruction table (the task's instruction goes through ``query_template``; retrieval documents get
        ``document_template``). ``instruction`` is a free-form instruction. ``None`` for both means documents.
        """
        if prompt is not None and instruction is not None:
            raise UserInputError("give either prompt= or instruction=, not both")
        if prompt is None and instruction is None:
            return [self.format_document(t) for t in texts]
        if instruction is not None:
            return [self.format_query(t, instruction) if self.uses_instructions else t for t in texts]
        assert prompt is not None
        if prompt in self.prompts:
            prefix = self.prompts[prompt]
            return [prefix + t for t in texts]
        tasks = task_instructions()
        if prompt in tasks:
            task = tasks[prompt]
            if side == "document" and not task.symmetric:
                return [self.format_document(t) for t in texts]
            if not self.uses_instructions:
                return list(texts)
            return [self.format_query(t, task.instruction) for t in texts]
        choices = sorted(set(self.prompts) | set(tasks))
        raise UserInputError(f"unknown prompt '{prompt}'; known prompts and tasks: {', '.join(choices)}")


# Known models: hub id -> spec. SFR and e5-mistral append EOS and pool on it.
_E5_MISTRAL = ModelSpec(pooling=PoolingMode.LASTTOKEN, normalize=True, append_eos=True, prepend_bos=True, max_length=4096,
                        padding_side="right", uses_instructions=True)
KNOWN_MODELS: dict[str, ModelSpec] = {
    "Salesforce/SFR-Embedding-Mistral": _E5_MISTRAL,
    "Salesforce/SFR-Embedding-2_R": _E5_MISTRAL,
    "intfloat/e5-mistral-7b-instruct": _E5_MISTRAL,
    "sentence-transformers/all-MiniLM-L6-v2": ModelSpec(pooling=PoolingMode.MEAN, normalize=True, append_eos=False,
                                                        max_length=256, uses_instructions=False),
}


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is not valid JSON: {exc}") from None


def _pooling_from_st(model_dir: Path) -> tuple[PoolingMode | None, bool | None]:
    """Read pooling and normalisation from sentence-transformers ``modules.json``."""
    modules = _read_json(model_dir / "modules.json")
    if not isinstance(modules, list):
        return None, None
    pooling: PoolingMode | None = None
    normalize = False
    for mod in modules:
        mtype = str(mod.get("type", ""))
        if mtype.endswith("Pooling"):
            cfg = _read_json(model_dir / mod.get("path", "1_Pooling") / "config.json") or {}
            assert isinstance(cfg, dict)
            if cfg.get("pooling_mode_lasttoken"):
                pooling = PoolingMode.LASTTOKEN
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = PoolingMode.MEAN
            elif cfg.get("pooling_mode_cls_token"):
                pooling = PoolingMode.CLS
            elif "pooling_mode" in cfg:
                pooling = PoolingMode.parse(str(cfg["pooling_mode"]))
            else:
                raise UserInputError(f"{model_dir}/{mod.get('path')}/config.json names no supported pooling mode")
        if mtype.endswith("Normalize"):
            normalize = True
    return pooling, normalize


def spec_from_model_dir(model_dir: Path, model_id: str | None = None, *, base: ModelSpec | None = None) -> ModelSpec:
    """Build a spec from a local model dir (sentence-transformers files first, then the known-model table)."""
    spec = base or KNOWN_MODELS.get(model_id or "", None) or ModelSpec()
    changes: dict[str, Any] = {}
    pooling, normalize = _pooling_from_st(model_dir)
    if pooling is not None:
        changes["pooling"] = pooling
        changes["normalize"] = bool(normalize)
    st_cfg = _read_json(model_dir / "config_sentence_transformers.json")
    if isinstance(st_cfg, dict) and isinstance(st_cfg.get("prompts"), dict):
        changes["prompts"] = {str(k): str(v) for k, v in st_cfg["prompts"].items() if v}
    sb = _read_json(model_dir / "sentence_bert_config.json")
    if isinstance(sb, dict) and sb.get("max_seq_length"):
        changes["max_length"] = int(sb["max_seq_length"])
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    if isinstance(tok_cfg, dict):
        if tok_cfg.get("add_eos_token") is True:
            changes["append_eos"] = True
        if tok_cfg.get("add_bos_token") is True:
            changes["prepend_bos"] = True
        if tok_cfg.get("padding_side") in ("left", "right"):
            changes["padding_side"] = tok_cfg["padding_side"]
    final_pooling = changes.get("pooling", spec.pooling)
    if final_pooling is not PoolingMode.LASTTOKEN and "append_eos" not in changes:
        changes["append_eos"] = False
    if final_pooling is not PoolingMode.LASTTOKEN and model_id not in KNOWN_MODELS:
        changes.setdefault("uses_instructions", False)
    return spec.replace(**changes)
