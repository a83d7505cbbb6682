"""Resolve ``--model`` (hub id, local dir or ``demo:NAME``) to a local safetensors dir, and load it.

Every source ends up as a local directory laid out like a hub repo, so export, the torch reference and fine-tuning
share one loading path. ``trust_remote_code`` is off unless asked; pickled weights (``*.bin``) are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, UserInputError
from ..spec import ModelSpec, spec_from_model_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Salesforce/SFR-Embedding-Mistral"
DTYPES = ("float32", "float16", "bfloat16")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "1_Pooling/*", "2_Normalize/*"]


@dataclass
class ResolvedModel:
    id: str  # what the user passed (hub id, demo:NAME or absolute dir)
    local_dir: Path
    spec: ModelSpec
    revision: str | None = None
    fingerprint: str = ""
    source: str = "local"  # hub | local | demo
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest_entry(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "local_dir": str(self.local_dir), "revision": self.revision,
                "fingerprint": self.fingerprint}


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        if pickles:
            raise ModelLoadError(f"{model_dir} has only pickled weights ({', '.join(pickles[:3])}); sfr-export loads safetensors only")
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights")
    return files


def fingerprint(model_dir: Path) -> str:
    """sha256 over config.json and every safetensors file (streamed)."""
    h = hashlib.sha256()
    cfg = model_dir / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in weight_files(model_dir):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _resolve_hub(model_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a transformers dependency
        raise ModelLoadError("huggingface_hub is needed to download hub models") from exc
    try:
        path = snapshot_download(repo_id=model_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not fetch '{model_id}' from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            "check the id and your network, or pass a local dir"
        ) from exc
    return Path(path)


def resolve_model(model: str, *, revision: str | None = None, trust_remote_code: bool = False,
                  spec_overrides: dict[str, Any] | None = None, compute_fingerprint: bool = True) -> ResolvedModel:
    """Turn ``--model`` into a ResolvedModel with a local dir and a spec."""
    if not model or not model.strip():
        raise UserInputError("--model is empty")
    if model.startswith("demo:"):
        from .demo import materialize_demo

        local_dir, model_id = materialize_demo(model), model
        source = "demo"
    elif Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        local_dir = Path(model).expanduser().resolve()
        if not local_dir.is_dir():
            raise ModelLoadError(f"model dir {local_dir} does not exist or is not a directory")
        model_id, source = str(local_dir), "local"
    else:
        if model.count("/") != 1:
            raise ModelLoadError(f"'{model}' is neither an existing local dir nor a hub id of the form owner/name")
        local_dir, model_id, source = _resolve_hub(model, revision), model, "hub"
    if not (local_dir / "config.json").is_file():
        raise ModelLoadError(f"{local_dir} has no config.json: not a transformers model dir")
    weight_files(local_dir)
    try:
        cfg = json.loads((local_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{local_dir / 'config.json'} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{local_dir / 'config.json'} is not a JSON object: not a transformers config")
    if cfg.get("auto_map") and not trust_remote_code:
        log.info("%s declares auto_map (remote code); it is ignored unless --trust-remote-code is given", model_id)
    known_key = model if source == "hub" else cfg.get("_sfr_export_known_as")
    spec = spec_from_model_dir(local_dir, known_key)
    if spec_overrides:
        spec = spec.replace(**spec_overrides)
    return ResolvedModel(id=model_id, local_dir=local_dir, spec=spec, revision=revision, source=source,
                         fingerprint=fingerprint(local_dir) if compute_fingerprint else "")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise UserInputError(f"unknown dtype '{name}' (expected one of {', '.join(DTYPES)})")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_backbone(model_dir: Path, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load the transformer backbone (no LM head) from safetensors, in eval mode."""
    from transformers import AutoModel

    weight_files(Path(model_dir))
    try:
        model = AutoModel.from_pretrained(str(model_dir), dtype=torch_dtype(dtype), use_safetensors=True,
                                          trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not load the model in {model_dir}: {str(exc).splitlines()[0][:200]}") from exc
    return model.to(device).eval()


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer in {model_dir}: {str(exc).splitlines()[0][:200]}") from exc
