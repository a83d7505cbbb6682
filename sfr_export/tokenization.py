"""Text -> token ids under a ModelSpec: prompts, truncation, EOS, padding and length-bucketed batches.

EOS is appended by this module, not by the tokenizer: transformers 5 can silently drop ``add_eos_token``
(mteb PR #5237), so for last-token models we tokenize without a trailing EOS, truncate to ``max_length - 1``
and append ``eos_token_id`` ourselves. Every sequence then ends in exactly one EOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .choice import Choice
from .errors import ArtifactError, UserInputError
from .spec import ModelSpec

log = logging.getLogger(__name__)


class Truncation(Choice, label="truncation policy"):
    TRUNCATE = "truncate"
    ERROR = "error"


@dataclass
class Encoded:
    ids: list[list[int]]
    truncated: int  # how many inputs were cut to max_length


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # positions of these rows in the caller's input order
    input_ids: np.ndarray  # int64 [b, s]
    attention_mask: np.ndarray  # int64 [b, s]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def validate_texts(texts: Sequence[str] | str) -> list[str]:
    """A ``str`` or a sequence (list, tuple) of ``str``, each non-empty valid Unicode; anything else is refused."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
        raise UserInputError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise UserInputError("no texts to embed: the input list is empty")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserInputError(f"input {i} is {type(t).__name__}, not str")
        if not t.strip():
            raise UserInputError(f"input {i} is empty or whitespace only")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UserInputError(f"input {i} is not valid Unicode: an unpaired surrogate at character {exc.start} "
                                 "(undecodable bytes in the source text?)") from None
    return texts


class JsonTokenizer:
    """A ``tokenizer.json`` + ``tokenizer_config.json`` read with the ``tokenizers`` library, exposing the small part
    of the transformers tokenizer interface that ``TextTokenizer`` uses."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        for name in ("bos", "eos", "pad", "sep"):
            setattr(self, f"{name}_token_id", self._id_of(cfg.get(f"{name}_token")))

    def _id_of(self, token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]}


def load_tokenizer_dir(directory: Path) -> Any:
    if not directory.is_dir():
        raise ArtifactError(f"tokenizer dir {directory} is missing: run `sfr-export export --force` to restore it")
    try:
        if (directory / "tokenizer.json").is_file():
            return JsonTokenizer(directory)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except ImportError as exc:
        raise ArtifactError(f"{directory} has no tokenizer.json and transformers is not installed ({exc})") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # tokenizers raises Exception
        raise ArtifactError(f"cannot load the tokenizer in {directory}: {exc} "
                            "(run `sfr-export export --force` to restore it)") from None
    except Exception as exc:  # tokenizers reports a corrupt tokenizer.json as a bare Exception
        if type(exc).__module__.startswith(("tokenizers", "builtins")):
            raise ArtifactError(f"cannot load the tokenizer in {directory}: {exc} "
                                "(run `sfr-export export --force` to restore it)") from None
        raise


class TextTokenizer:
    """Wraps a Hugging Face tokenizer with the spec's EOS, truncation and padding rules."""

    def __init__(self, tokenizer: Any, spec: ModelSpec, *, truncation: Truncation = Truncation.TRUNCATE):
        self.tok = tokenizer
        self.spec = spec
        self.truncation = Truncation.parse(truncation)
        eos = getattr(tokenizer, "eos_token_id", None)
        if spec.append_eos and eos is None:
            raise UserInputError("spec says append_eos but the tokenizer has no eos_token_id")
        self.eos_id: int | None = eos if spec.append_eos else None
        bos = getattr(tokenizer, "bos_token_id", None)
        if spec.prepend_bos and bos is None:
            raise UserInputError("spec says prepend_bos but the tokenizer has no bos_token_id")
        self.bos_id: int | None = bos if spec.prepend_bos else None
        if hasattr(tokenizer, "model_max_length"):
            tokenizer.model_max_length = 1 << 60  # we truncate ourselves; silences the false "longer than" warning
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id: int = int(pad if pad is not None else (eos if eos is not None else 0))
        self.truncated_total = 0

    @classmethod
    def from_dir(cls, tokenizer_dir: Path, spec: ModelSpec, **kw: Any) -> "TextTokenizer":
        """The artifact's ``tokenizer/``: read with ``tokenizers`` alone when it holds ``tokenizer.json`` (no torch,
        no transformers needed), else with transformers' AutoTokenizer."""
        return cls(load_tokenizer_dir(Path(tokenizer_dir)), spec, **kw)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, texts: Sequence[str], *, truncation: Truncation | str | None = None) -> Encoded:
        """Tokenize with the spec's BOS/EOS. ``truncation`` overrides this tokenizer's policy for one call."""
        texts = validate_texts(texts)
        policy = self.truncation if truncation is None else Truncation.parse(truncation)
        spec = self.spec
        budget = spec.max_length - (1 if self.eos_id is not None else 0) - (1 if self.bos_id is not None else 0)
        # No truncation inside the tokenizer: we need the true length to count (or refuse) truncation.
        raw = self.tok(list(texts), add_special_tokens=True, truncation=False, padding=False)["input_ids"]
        out: list[list[int]] = []
        truncated = 0
        for i, ids in enumerate(raw):
            ids = list(ids)
            if self.bos_id is not None and ids and ids[0] == self.bos_id:
                ids = ids[1:]  # the tokenizer added it; we add it back below, outside the truncation budget
            if self.eos_id is not None:
                while ids and ids[-1] == self.eos_id:  # the tokenizer may or may not have added it
                    ids.pop()
            if len(ids) > budget:
                if policy is Truncation.ERROR:
                    raise UserInputError(f"input {i} has {len(ids)} tokens, over the limit of {budget} (truncation='error')")
                truncated += 1
                ids = self._truncate(ids, budget)
            if self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.eos_id is not None:
                ids.append(self.eos_id)
            out.append(ids)
        if truncated:
            self.truncated_total += truncated
            log.warning("truncated %d of %d inputs to max_length=%d", truncated, len(texts), spec.max_length)
        return Encoded(out, truncated)

    def fit_ids(self, seqs: Sequence[Sequence[int]], *, truncation: Truncation | str | None = None) -> list[list[int]]:
        """Caller-made token ids held to ``spec.max_length`` under the same policy as ``encode``: refused with
        ``error``; with ``truncate`` cut, keeping a final EOS."""
        policy = self.truncation if truncation is None else Truncation.parse(truncation)
        limit = self.spec.max_length
        out: list[list[int]] = []
        for i, s in enumerate(seqs):
            s = list(s)
            if len(s) > limit:
                if policy is Truncation.ERROR:
                    raise UserInputError(f"input {i} has {len(s)} tokens, over max_length {limit} (truncation='error')")
                keep_eos = self.eos_id is not None and s[-1] == self.eos_id
                s = s[: limit - 1] + [s[-1]] if keep_eos else s[:limit]
                self.truncated_total += 1
            out.append(s)
        return out

    def _truncate(self, ids: list[int], budget: int) -> list[int]:
        # Keep a trailing special token (e.g. BERT's [SEP]) when the tokenizer added one and we don't append EOS.
        if self.eos_id is None:
            sep = getattr(self.tok, "sep_token_id", None)
            if sep is not None and ids and ids[-1] == sep:
                return ids[: budget - 1] + [sep]
        return ids[:budget]

    def pad(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(s) for s in seqs)
        ids = np.full((len(seqs), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), longest), dtype=np.int64)
        for r, s in enumerate(seqs):
            if self.spec.padding_side == "right":
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
            else:
                ids[r, longest - len(s):] = s
                mask[r, longest - len(s):] = 1
        return ids, mask


def right_align(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same batch right-padded: each row's tokens moved to the front (a no-op copy-free path when already so).

    For graphs that are exact only for right padding (``ModelSpec.graph_padding == "right"``). A row whose tokens
    are not contiguous (a mask with holes) cannot be re-padded and raises UserInputError.
    """
    mask = np.asarray(attention_mask)
    lengths = mask.sum(axis=1)
    want = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if np.array_equal(mask != 0, want):
        return input_ids, attention_mask
    ids = np.asarray(input_ids)
    new_ids = np.zeros_like(ids)
    for r in range(mask.shape[0]):
        on = np.flatnonzero(mask[r])
        if on.size and on[-1] - on[0] + 1 != on.size:
            raise UserInputError(f"row {r} of the attention mask has holes; a causal graph needs each row's tokens "
                                 "contiguous (right or left padding)")
        new_ids[r, : on.size] = ids[r, on]
    return new_ids, want.astype(mask.dtype)


def length_batches(seqs: Sequence[Sequence[int]], tokenizer: TextTokenizer, *, batch_size: int,
                   max_batch_tokens: int | None = None) -> Iterator[Batch]:
    """Sort by length (longest first) and cut into batches of at most ``batch_size`` rows and, when given,
    ``max_batch_tokens`` padded tokens. Each batch carries the caller-order indices of its rows."""
    if batch_size < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise UserInputError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    start = 0
    while start < len(order):
        longest = len(seqs[order[start]])
        n = batch_size
        if max_batch_tokens is not None:
            n = max(1, min(n, max_batch_tokens // max(longest, 1)))
        idx = order[start:start + n]
        ids, mask = tokenizer.pad([seqs[i] for i in idx])
        yield Batch(np.asarray(idx, dtype=np.int64), ids, mask)
        start += n
