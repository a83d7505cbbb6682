"""Helpers shared by stages: artifact-dir preparation; the subprocess worker protocol lives in ``sfr_export.worker``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..artifact import ArtifactRecord, Manifest, atomic_dir, atomic_write_text, writer_lock
from ..errors import ArtifactError
from ..artifact.layout import SPEC_FILE, TOKENIZER_DIR
from ..models import ResolvedModel, load_tokenizer
from ..worker import peak_rss_mb, progress, run_worker, worker_main

__all__ = ["peak_rss_mb", "prepare_output", "progress", "run_worker", "worker_main", "writer_lock"]

log = logging.getLogger(__name__)


def prepare_output(root: Path, model: ResolvedModel, *, dtype: str = "float32", repair: bool = False) -> Manifest:
    """Open the output dir's manifest for ``model``; write ``spec.json`` and ``tokenizer/`` and record their sha256.

    They are (re)written when missing, when they no longer match what the manifest recorded, or with ``repair``."""
    manifest = Manifest.open_for_model(root, model.manifest_entry())
    root = Path(root)
    damaged = _damaged_base(manifest)
    spec_json = json.dumps(model.spec.to_dict(), indent=2)
    spec_path = root / SPEC_FILE
    if repair or damaged or not spec_path.is_file() or spec_path.read_bytes() != spec_json.encode("utf-8"):
        atomic_write_text(spec_path, spec_json)
    if repair or damaged or not (root / TOKENIZER_DIR).is_dir():
        if damaged:
            log.warning("restoring spec.json and tokenizer/: %s", damaged)
        tok = load_tokenizer(model.local_dir)
        with atomic_dir(root / TOKENIZER_DIR) as tmp:
            tok.save_pretrained(str(tmp))
    manifest.set_spec(model.spec.to_dict())
    manifest.set_base_files([ArtifactRecord.of(root, spec_path, "spec")] +
                            [ArtifactRecord.of(root, f, "tokenizer") for f in sorted((root / TOKENIZER_DIR).rglob("*"))
                             if f.is_file()])
    manifest.data["reference_dtype"] = dtype
    manifest.save()
    return manifest


def _damaged_base(manifest: Manifest) -> str:
    """Why the recorded spec/tokenizer files fail their check, or '' when they pass (or none are recorded)."""
    try:
        manifest.verify_base()
    except ArtifactError as exc:
        return str(exc)
    return ""
