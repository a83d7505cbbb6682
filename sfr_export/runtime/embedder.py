"""``Embedder``: one API over the torch, onnxruntime and tensorrt runners of an output dir.

Thread-safe: tokenization is serialised (Hugging Face fast tokenizers are not re-entrant), inference runs
concurrently on ONNX Runtime (``InferenceSession.run`` is thread-safe) and under a lock on the other runners.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, ChecksumMismatchError, UserInputError
from .._optional import available
from ..artifact import Artifact, Backend, Manifest, Variant
from ..artifact.layout import TOKENIZER_DIR
from ..spec import ModelSpec
from ..tokenization import Batch, Encoded, TextTokenizer, Truncation, length_batches, right_align, validate_texts
from .runner import Runner

log = logging.getLogger(__name__)

# Runners whose ``infer`` may be called from many threads at once; the others run under a lock.
THREAD_SAFE_RUNNERS = frozenset({"onnxruntime"})
# Padded tokens per runner call unless the caller says otherwise: a 4,096-token passage rides with at most 3 others.
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class BatchStats:
    """What one runner call processed; passed to ``encode_ids(on_batch=...)`` (the server's metrics use it)."""

    rows: int
    tokens: int  # real tokens (attention mask sum)
    padded_tokens: int  # rows * padded length
    seconds: float


class Embedder:
    """Encode texts to float32, L2-normalised embeddings with the artifact's spec, prompts and batching."""

    def __init__(self, runner: Runner, tokenizer: TextTokenizer, *, batch_size: int = 32,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, info: dict[str, Any] | None = None):
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise UserInputError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.spec = tokenizer.spec
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.info = dict(info or {})
        self._tok_lock = threading.Lock()
        self._infer_lock = threading.Lock()
        self._thread_safe = runner.name in THREAD_SAFE_RUNNERS
        self._vocab_size: int | None = None
        self._dim: int | None = None
        runner.activate()
        self.info.setdefault("backend", runner.name)
        self.info["runner"] = runner.describe()

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, root: str | Path, *, backend: Backend | str = Backend.AUTO, variant: Variant | str | None = None,
                      verify: bool = True, providers: Sequence[Any] | None = None, allow_fallback: bool = False,
                      truncation: str | Truncation = Truncation.TRUNCATE, batch_size: int = 32,
                      max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, torch_dtype: str | None = None,
                      device: str = "cpu", session_config: dict[str, str] | None = None,
                      intra_op_threads: int | None = None) -> "Embedder":
        """Open an output dir. ``backend="auto"`` picks TensorRT when an engine and TensorRT are present, else
        ONNX Runtime (CUDA provider when installed, else CPU), else torch; ``info["why"]`` says why.
        ``verify`` checks the sha256 of the spec, the tokenizer files and the model loaded against the manifest.
        ``session_config`` adds ONNX Runtime session entries over the manifest's."""
        backend = Backend.parse(backend)
        variant = Variant.parse(variant) if variant is not None else None
        art = Artifact.open(root)
        if verify:
            art.verify_base()
        spec = art.spec()
        tok = TextTokenizer.from_dir(Path(root) / TOKENIZER_DIR, spec, truncation=Truncation.parse(truncation))
        opts = _RunnerOptions(verify=verify, providers=providers, allow_fallback=allow_fallback,
                              torch_dtype=torch_dtype, device=device, session_config=session_config,
                              intra_op_threads=intra_op_threads)
        runner, info = _make_runner(art, backend, variant, opts)
        info["verified"] = verify
        log.info("Embedder on %s: backend=%s (%s)", root, info["backend"],
                 ", ".join(f"{k}={v}" for k, v in info.items() if k != "backend"))
        return cls(runner, tok, batch_size=batch_size, max_batch_tokens=max_batch_tokens, info=info)

    # ---- encoding ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            with self._tok_lock:
                self._vocab_size = self.tokenizer.vocab_size
        return self._vocab_size

    @property
    def truncated_total(self) -> int:
        """How many inputs were truncated to ``spec.max_length`` since this Embedder was made."""
        return self.tokenizer.truncated_total

    def tokenize(self, texts: Sequence[str] | str, *, prompt: str | None = None, instruction: str | None = None,
                 side: str = "query", truncation: Truncation | str | None = None) -> Encoded:
        """Format with the prompt and tokenize (BOS/EOS per spec); ``truncation`` overrides the policy once."""
        texts = validate_texts(texts)
        if side not in ("query", "document"):
            raise UserInputError(f"side must be 'query' or 'document', got {side!r}")
        formatted = self.spec.apply_prompt(texts, prompt, instruction=instruction, side=side)
        with self._tok_lock:
            return self.tokenizer.encode(formatted, truncation=truncation)

    def check_ids(self, seqs: Sequence[Sequence[int]]) -> None:
        """Raise UserInputError unless every sequence is a non-empty list of in-vocabulary ints."""
        if not isinstance(seqs, Sequence) or isinstance(seqs, (str, bytes)):
            raise UserInputError(f"token ids must be a list of lists of int, got {type(seqs).__name__}")
        vocab = self.vocab_size
        for i, s in enumerate(seqs):
            if not isinstance(s, Sequence) or isinstance(s, (str, bytes)):
                raise UserInputError(f"input {i} is {type(s).__name__}, not a list of token ids")
            if len(s) == 0:
                raise UserInputError(f"input {i} is an empty token list")
            for t in s:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise UserInputError(f"input {i} holds {type(t).__name__} {t!r}, not a token id (int)")
                if not 0 <= t < vocab:
                    raise UserInputError(f"input {i} holds token id {t}, outside the vocabulary [0, {vocab})")

    def encode_ids(self, seqs: Sequence[Sequence[int]], *, batch_size: int | None = None,
                   max_batch_tokens: int | None = None, on_batch: Callable[[BatchStats], None] | None = None,
                   check: bool = True) -> np.ndarray:
        """Embed already-tokenized sequences (as produced by ``tokenize``) in caller order.

        Batches hold at most ``batch_size`` rows and ``max_batch_tokens`` padded tokens (longest first).
        ``check=False`` skips the vocabulary check for ids that came from ``tokenize``."""
        if check:
            self.check_ids(seqs)  # first: it names a wrong type (None, a str) that len() would crash on
        if len(seqs) == 0:
            raise UserInputError("no inputs to embed: the input list is empty")
        if check:
            seqs = self.tokenizer.fit_ids(seqs)
        mbt = max_batch_tokens if max_batch_tokens is not None else self.max_batch_tokens
        bs = batch_size if batch_size is not None else self.batch_size
        batches = length_batches(seqs, self.tokenizer, batch_size=bs, max_batch_tokens=mbt)
        return embed_batches(lambda b: self._infer(b, on_batch), batches, len(seqs))

    def _infer(self, batch: Batch, on_batch: Callable[[BatchStats], None] | None) -> np.ndarray:
        t0 = time.perf_counter()
        ids, mask = batch.input_ids, batch.attention_mask
        if self.spec.graph_padding == "right":  # a causal graph: exact for right padding only
            ids, mask = right_align(ids, mask)
        if self._thread_safe:
            emb = self.runner.infer(ids, mask)
        else:
            with self._infer_lock:
                emb = self.runner.infer(ids, mask)
        if on_batch is not None:
            on_batch(BatchStats(rows=int(batch.input_ids.shape[0]), tokens=batch.tokens,
                                padded_tokens=int(batch.input_ids.size), seconds=time.perf_counter() - t0))
        return emb

    def encode(self, texts: Sequence[str] | str, *, prompt: str | None = None, instruction: str | None = None,
               batch_size: int | None = None, max_batch_tokens: int | None = None, side: str = "query",
               truncation: Truncation | str | None = None) -> np.ndarray:
        """Embed ``texts`` (float32 [n, dim], L2-normalised when the spec says so), in input order."""
        enc = self.tokenize(texts, prompt=prompt, instruction=instruction, side=side, truncation=truncation)
        return self.encode_ids(enc.ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens, check=False)

    def encode_queries(self, texts: Sequence[str], *, task: str | None = None, instruction: str | None = None,
                       **kw: Any) -> np.ndarray:
        if task is None and instruction is None:
            task = "web_search"
        return self.encode(texts, prompt=task, instruction=instruction, side="query", **kw)

    def encode_documents(self, texts: Sequence[str], *, task: str | None = None, **kw: Any) -> np.ndarray:
        return self.encode(texts, prompt=task, side="document", **kw)

    # ---- async wrappers: run in a worker thread so an event loop stays responsive ------------------------
    async def aencode(self, texts: Sequence[str] | str, **kw: Any) -> np.ndarray:
        return await asyncio.to_thread(self.encode, texts, **kw)

    async def aencode_queries(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        return await asyncio.to_thread(self.encode_queries, texts, **kw)

    async def aencode_documents(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        return await asyncio.to_thread(self.encode_documents, texts, **kw)

    async def aencode_ids(self, seqs: Sequence[Sequence[int]], **kw: Any) -> np.ndarray:
        return await asyncio.to_thread(self.encode_ids, seqs, **kw)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"]).shape[1])
        return self._dim

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def embed_batches(infer: Callable[[Batch], np.ndarray], batches: Iterable[Batch], n: int) -> np.ndarray:
    """Run ``infer`` on each batch and put its rows back in caller order: the one embed-and-scatter loop."""
    out: np.ndarray | None = None
    for batch in batches:
        emb = infer(batch)
        if out is None:
            out = np.empty((n, emb.shape[1]), dtype=np.float32)
        out[batch.indices] = emb
    if out is None:
        raise UserInputError("no inputs to embed: no batches")
    return out


def _default_providers() -> list[str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class _RunnerOptions:
    verify: bool = True
    providers: Sequence[Any] | None = None
    allow_fallback: bool = False
    torch_dtype: str | None = None
    device: str = "cpu"
    session_config: dict[str, str] | None = None
    intra_op_threads: int | None = None


def _choose_backend(art: Artifact, variant: Variant | None) -> tuple[Backend, str]:
    """The best backend this machine can run for this artifact, and why."""
    if variant is None and art.engine() is not None and art.tensorrt_unavailable() is None:
        return Backend.TENSORRT, "auto: a TensorRT engine is recorded and TensorRT is installed"
    if art.variants():
        if not available("onnxruntime"):
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime (or the [gpu] extra)")
        return Backend.ONNXRUNTIME, "auto: ONNX model present, no usable TensorRT engine"
    if variant is not None:
        raise ArtifactError(f"{art.root} has no ONNX model, so no '{variant.value}' variant")
    if art.torch_model_dir() is not None:
        return Backend.TORCH, "auto: no ONNX model in the artifact; the torch reference model dir is present"
    raise ArtifactError(f"{art.root} has no ONNX model and its model dir {art.manifest.model.get('local_dir')} is gone: "
                        "run `sfr-export export`")


def _make_runner(art: Artifact, backend: Backend, variant: Variant | None,
                 opts: _RunnerOptions) -> tuple[Runner, dict[str, Any]]:
    why = "requested"
    if backend is Backend.AUTO:
        backend, why = _choose_backend(art, variant)
    if backend is Backend.TORCH:
        return _torch_runner(art, opts, why)
    if backend is Backend.TENSORRT:
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner.from_manifest(art.manifest, verify=opts.verify), {"backend": "tensorrt", "why": why}
    return _ort_runner(art, variant, opts, why)


def _torch_runner(art: Artifact, opts: _RunnerOptions, why: str) -> tuple[Runner, dict[str, Any]]:
    from .torch_runner import TorchRunner

    model_dir = Path(art.manifest.model["local_dir"])
    if opts.verify:
        _verify_model_dir(art.manifest, model_dir)
    dtype = opts.torch_dtype or art.manifest.data.get("reference_dtype", "float32")
    return (TorchRunner(model_dir, art.spec(), dtype=dtype, device=opts.device),
            {"backend": "torch", "dtype": dtype, "why": why})


def _ort_runner(art: Artifact, variant: Variant | None, opts: _RunnerOptions, why: str) -> tuple[Runner, dict[str, Any]]:
    from .ort_runner import OrtRunner

    variants = art.variants()
    providers = list(opts.providers) if opts.providers else _default_providers()
    cuda = "CUDAExecutionProvider" in [p if isinstance(p, str) else p[0] for p in providers]
    if variant is None:
        variant = art.preferred_variant(cuda=cuda)
        why = f"{why}; variant {variant.value}: " + ("fastest on CUDA" if cuda else "highest fidelity on CPU")
    if variant not in variants:
        have = ", ".join(v.value for v in variants) or "none"
        raise ArtifactError(f"{art.root} has no '{variant.value}' ONNX variant (have: {have})")
    rec = variants[variant]
    if opts.verify:
        art.manifest.verify_stage(rec.name)
    session_config = {**dict(rec.config.get("ort_session_config", {}) or {}), **dict(opts.session_config or {})}
    # The CPU provider runs the export's CPU form (com.microsoft GroupQueryAttention / MultiHeadAttention) when the
    # stage wrote one (see stages/ort_attention).
    form = "onnx-cpu" if not cuda and rec.files("onnx-cpu") else "onnx"
    runner = OrtRunner(art.manifest.artifact_path(rec.name, form), providers=providers,
                       session_config=session_config, allow_fallback=opts.allow_fallback,
                       intra_op_threads=opts.intra_op_threads)
    return runner, {"backend": "onnxruntime", "variant": variant.value, "why": why, "stage": rec.name, "form": form}


def _verify_model_dir(manifest: Manifest, model_dir: Path) -> None:
    from ..models.loading import fingerprint

    want = manifest.model.get("fingerprint")
    if not model_dir.is_dir():
        raise ArtifactError(f"the torch backend needs the model dir {model_dir}, which is gone")
    if want and fingerprint(model_dir) != want:
        raise ChecksumMismatchError(f"model dir {model_dir} no longer matches the manifest fingerprint {str(want)[:12]}…: "
                                    "the weights changed since export")


def embedder_for_model(model_dir: Path, spec: ModelSpec, *, dtype: str = "float32", device: str = "cpu",
                       model: Any = None, **kw: Any) -> Embedder:
    """A torch-backed Embedder straight from a model dir (no artifact dir): the reference side of validation."""
    from ..models import load_tokenizer
    from .torch_runner import TorchRunner

    tok = TextTokenizer(load_tokenizer(model_dir), spec)
    return Embedder(TorchRunner(model_dir, spec, dtype=dtype, device=device, model=model), tok,
                    info={"backend": "torch", "dtype": dtype}, **kw)
