"""Write the fine-tuning outputs: the LoRA adapter, the merged model dir, and ``finetune.json``.

The merged dir is laid out like the base (config.json, ``*.safetensors``, tokenizer files with ``add_eos_token``,
``modules.json``, ``1_Pooling/config.json``, ``config_sentence_transformers.json`` prompts), so
``sfr-export build --model OUTPUT/merged`` reads the same spec as the base. That is checked before it is published.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..artifact import atomic_dir, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_SKIP = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "generation_config.json"}


def copy_spec_files(base_dir: Path, dest: Path) -> list[str]:
    """Copy everything of the base except weights and config.json (tokenizer, sentence-transformers files)."""
    copied = []
    for src in sorted(Path(base_dir).rglob("*")):
        rel = src.relative_to(base_dir)
        if src.is_dir() or rel.parts[0].startswith(".") or str(rel) in _SKIP or src.suffix in _WEIGHT_SUFFIXES:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        copied.append(str(rel))
    return copied


def save_merged(peft_model: Any, resolved: Any, dest_final: Path) -> Path:
    """Merge the adapter into a copy of the base weights and write a model dir ``sfr-export build`` accepts."""
    from ..models.loading import resolve_model
    from ..spec import KNOWN_MODELS

    base_cfg = json.loads((Path(resolved.local_dir) / "config.json").read_text(encoding="utf-8"))
    merged = peft_model.merge_and_unload(safe_merge=True)
    with atomic_dir(dest_final) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        copy_spec_files(Path(resolved.local_dir), tmp)
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        known = resolved.id if resolved.id in KNOWN_MODELS else base_cfg.get("_sfr_export_known_as")
        if known:  # keep the known-model spec (e.g. SFR's max_length 4096 and BOS) for the merged weights
            cfg["_sfr_export_known_as"] = known
        cfg["_sfr_export_finetuned_from"] = resolved.id
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        got = resolve_model(str(tmp), compute_fingerprint=False).spec
        if got != resolved.spec:
            raise TrainingError(f"the merged model's spec differs from the base's: {got.to_dict()} vs {resolved.spec.to_dict()}")
    return dest_final


def write_outputs(output: Path, peft_model: Any, resolved: Any, cfg: Any, result: Any) -> None:
    output = Path(output)
    adapter = output / "adapter"
    with atomic_dir(adapter) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
    result.adapter_dir = adapter
    if cfg.train.merge:
        result.merged_dir = save_merged(peft_model, resolved, output / "merged")
    files = {}
    for d in (adapter, result.merged_dir):
        if d is not None:
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    files[str(p.relative_to(output))] = sha256_file(p)
    rec = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "base": resolved.manifest_entry(),
           "spec": resolved.spec.to_dict(), "config": cfg.to_dict(),
           "figures": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items() if k != "losses"},
           "loss_first": result.losses[0] if result.losses else None,
           "loss_last": result.losses[-1] if result.losses else None, "losses": result.losses, "files": files}
    atomic_write_text(output / "finetune.json", json.dumps(rec, indent=2))
    log.info("wrote %s (adapter%s)", output, " + merged model" if result.merged_dir else "")
