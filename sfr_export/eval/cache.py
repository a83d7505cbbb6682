"""On-disk cache of reference embeddings, so repeated CI runs skip the expensive side of the comparison.

The key is a sha256 over the model fingerprint (the manifest's checksum of the weights), the spec, the reference
backend description (backend, dtype, variant) and the exact token ids of the texts (which already cover the texts,
their prompts and the tokenizer). Any change to one of these is a miss. Entries are ``.npy`` files written
atomically; a corrupt entry is treated as a miss and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import atomic_path

log = logging.getLogger(__name__)

CACHE_ENV = "SFR_EXPORT_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sfr-export")) / "verify-reference"


def model_key(fingerprint: str, spec: dict[str, Any], reference: dict[str, Any]) -> str:
    blob = json.dumps({"fingerprint": fingerprint, "spec": spec, "reference": reference}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def ids_key(model: str, ids: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256(model.encode("ascii"))
    for seq in ids:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


class ReferenceCache:
    def __init__(self, directory: Path | None = None, *, enabled: bool = True):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str, rows: int) -> np.ndarray | None:
        if not self.enabled:
            return None
        p = self._path(key)
        if p.is_file():
            try:
                arr = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as exc:
                log.warning("reference cache entry %s is unreadable (%s): recomputing", p, exc)
                arr = None
            if arr is not None and arr.ndim == 2 and arr.shape[0] == rows:
                self.hits += 1
                return arr.astype(np.float32, copy=False)
        self.misses += 1
        return None

    def put(self, key: str, emb: np.ndarray) -> None:
        if not self.enabled:
            return
        p = self._path(key)
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(emb, dtype=np.float32), allow_pickle=False)

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "dir": str(self.dir), "hits": self.hits, "misses": self.misses}
