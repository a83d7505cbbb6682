"""Where each part of an output dir lives. Every reader and writer takes its paths from here.

```
OUT/
  manifest.json            stage records: config, figures, files with sha256, versions (``manifest.py``)
  spec.json                the model spec: pooling, normalize, EOS, prompts, max length, padding side
  tokenizer/               the tokenizer files (tokenizer.json, tokenizer_config.json, ...)
  onnx/<variant>/          model.onnx (+ model.onnx.data); variants: fp32, fp16, int8, int8-cpu
  engine/<precision>/      model.plan + model.plan.json (the sidecar) + timing.cache
  reports/verify/          report.json / .md / .html / junit.xml
  logs/                    one log per stage worker run
```
"""

from __future__ import annotations

from pathlib import Path

from .enums import Precision, Variant

MANIFEST_FILE = "manifest.json"
SPEC_FILE = "spec.json"
TOKENIZER_DIR = "tokenizer"
ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
ENGINE_DIR = "engine"
ENGINE_FILE = "model.plan"
SIDECAR_FILE = "model.plan.json"
TIMING_CACHE_FILE = "timing.cache"
REPORTS_DIR = "reports"
LOGS_DIR = "logs"
LOCK_FILE = ".sfr-export.lock"


def onnx_dir(root: Path, variant: Variant) -> Path:
    return Path(root) / ONNX_DIR / Variant.parse(variant).value


def engine_dir(root: Path, precision: Precision) -> Path:
    return Path(root) / ENGINE_DIR / Precision.parse(precision).value


def reports_dir(root: Path, name: str) -> Path:
    return Path(root) / REPORTS_DIR / name


def log_path(root: Path, name: str) -> Path:
    """``logs/<name>.log``; ``name`` may hold a ``:`` (stage names), which is kept out of file names."""
    return Path(root) / LOGS_DIR / f"{name.replace(':', '-')}.log"
