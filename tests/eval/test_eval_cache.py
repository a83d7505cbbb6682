"""The reference-embedding cache: keyed by model fingerprint + spec + reference + token ids; atomic; robust."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfr_export.eval.cache import ReferenceCache, ids_key, model_key
from sfr_export.spec import ModelSpec


def test_keys_change_with_model_spec_reference_and_ids() -> None:
    spec = ModelSpec().to_dict()
    base = model_key("abc", spec, {"backend": "torch"})
    assert base == model_key("abc", dict(spec), {"backend": "torch"})
    assert base != model_key("abd", spec, {"backend": "torch"})
    assert base != model_key("abc", ModelSpec(max_length=64).to_dict(), {"backend": "torch"})
    assert base != model_key("abc", spec, {"backend": "onnxruntime", "variant": "fp32"})
    ids = [[1, 2, 3], [4, 5]]
    assert ids_key(base, ids) == ids_key(base, [[1, 2, 3], [4, 5]])
    assert ids_key(base, ids) != ids_key(base, [[1, 2], [3, 4, 5]])  # same tokens, other split
    assert ids_key(base, ids) != ids_key(base, [[4, 5], [1, 2, 3]])


def test_put_get_roundtrip_and_counts(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    emb = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert cache.get("k" * 64, 3) is None
    cache.put("k" * 64, emb)
    got = cache.get("k" * 64, 3)
    assert got is not None and np.array_equal(got, emb)
    assert cache.get("k" * 64, 4) is None  # wrong row count: a miss, never a wrong answer
    assert (cache.hits, cache.misses) == (1, 2)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left no temp file


def test_corrupt_entry_is_a_miss_and_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    cache = ReferenceCache(tmp_path)
    cache.put("c" * 64, np.ones((2, 2), np.float32))
    next(tmp_path.rglob("*.npy")).write_bytes(b"not numpy")
    assert cache.get("c" * 64, 2) is None
    off = ReferenceCache(tmp_path / "off", enabled=False)
    off.put("d" * 64, np.ones((2, 2), np.float32))
    assert off.get("d" * 64, 2) is None and not (tmp_path / "off").exists()
