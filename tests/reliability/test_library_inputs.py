"""Library input rules: ``encode`` takes a str or a sequence of str, anything else is a UserInputError naming the
type; ``batch_size`` is checked per call; ``encode_ids`` holds ids to max_length under the truncation policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfr_export import Embedder
from sfr_export.errors import UserInputError


@pytest.fixture(scope="module")
def emb(tiny_artifact: Path):
    e = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant="fp32")
    yield e
    e.close()


@pytest.mark.parametrize("bad, named", [
    (None, "NoneType"),
    ({"a": 1}, "dict"),
    (b"bytes", "bytes"),
    (42, "int"),
    ({"a", "b"}, "set"),
    (["ok", None], "input 1 is NoneType"),
    (["ok", 3.5], "input 1 is float"),
])
def test_encode_refuses_what_is_not_text(emb, bad, named) -> None:
    with pytest.raises(UserInputError, match=named):
        emb.encode(bad)


@pytest.mark.parametrize("texts", [[], [""], ["ok", "   "]])
def test_encode_refuses_empty_input(emb, texts) -> None:
    with pytest.raises(UserInputError):
        emb.encode(texts)


def test_lone_surrogate_is_refused_by_index(emb) -> None:
    with pytest.raises(UserInputError, match="input 1"):
        emb.encode(["fine", "bad \ud800 text"])


def test_tuple_is_a_sequence_of_text(emb) -> None:
    np.testing.assert_allclose(emb.encode(("a", "b")), emb.encode(["a", "b"]), atol=1e-6)


@pytest.mark.parametrize("call", ["encode", "encode_ids"])
@pytest.mark.parametrize("value", [0, -1])
def test_per_call_batch_size_is_checked(emb, call, value) -> None:
    arg = ["hello"] if call == "encode" else emb.tokenize(["hello"]).ids
    with pytest.raises(UserInputError, match=f"batch_size must be >= 1, got {value}"):
        getattr(emb, call)(arg, batch_size=value)


def test_per_call_batch_size_is_used(emb) -> None:
    texts = [f"text number {i}" for i in range(5)]
    rows: list[int] = []
    want = emb.encode(texts)
    seqs = emb.tokenize(texts).ids
    got = emb.encode_ids(seqs, batch_size=2, on_batch=lambda s: rows.append(s.rows))
    assert rows == [2, 2, 1]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("bad", [None, "abc", [None], [[1, "x"]], [[]]])
def test_encode_ids_refuses_what_is_not_token_ids(emb, bad) -> None:
    with pytest.raises(UserInputError):
        emb.encode_ids(bad)


def test_encode_ids_over_max_length_follows_the_truncation_policy(tiny_artifact: Path, emb) -> None:
    limit = emb.spec.max_length
    long_ids = emb.tokenize(["word " * (3 * limit)], truncation="truncate").ids  # cut to the limit, EOS kept
    assert len(long_ids[0]) == limit
    over = [long_ids[0][:-1] + [7] * 20 + long_ids[0][-1:]]  # the same, 20 ids too long
    # truncate (the library default, as for encode): cut to max_length keeping the final EOS -> the same as encode's
    np.testing.assert_allclose(emb.encode_ids(over), emb.encode_ids(long_ids), atol=1e-5)
    strict = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant="fp32", truncation="error")
    try:
        with pytest.raises(UserInputError, match=f"input 0 has {limit + 20} tokens, over max_length {limit}"):
            strict.encode_ids(over)
        with pytest.raises(UserInputError, match="input 0 has .* tokens, over the limit"):
            strict.encode(["word " * (3 * limit)])
    finally:
        strict.close()
