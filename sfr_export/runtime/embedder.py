"""``Embedder``: one API over the torch, onnxruntime and tensorrt runners of an output dir.

Thread-safe: tokenization is serialised (Hugging Face fast tokenizers are not re-entrant), inference runs
concurrently on ONNX Runtime (``InferenceSession.run`` is thread-safe) and under a lock on the other runners.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, ChecksumMismatchError, UserInputError
from ..manifest import Manifest
from ..spec import ModelSpec
from ..tokenization import Batch, Encoded, TextTokenizer, Truncation, length_batches, right_align, validate_texts
from .runner import Runner

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
SPEC_FILE = "spec.json"
TOKENIZER_DIR = "tokenizer"
# Runners whose ``infer`` may be called from many threads at once; the others run under a lock.
THREAD_SAFE_RUNNERS = frozenset({"onnxruntime"})
# ``auto`` on CPU prefers fidelity (fp32), on a CUDA provider speed (fp16 first).
CPU_VARIANT_ORDER = ("fp32", "fp16", "int8-cpu", "int8-dynamic", "int8")
CUDA_VARIANT_ORDER = ("fp16", "fp32", "int8")
# Padded tokens per runner call unless the caller says otherwise: a 4,096-token passage rides with at most 3 others.
DEFAULT_MAX_BATCH_TOKENS = 16384


@dataclass(frozen=True)
class BatchStats:
    """What one runner call processed; passed to ``encode_ids(on_batch=...)`` (the server's metrics use it)."""

    rows: int
    tokens: int  # real tokens (attention mask sum)
    padded_tokens: int  # rows * padded length
    seconds: float


def onnx_variants(manifest: Manifest) -> dict[str, str]:
    """variant name (fp32, fp16, int8, ...) -> stage name, for every stage that produced an ONNX model."""
    out: dict[str, str] = {}
    for name, rec in manifest.stages.items():
        variant = rec.config.get("variant")
        if variant and rec.status != "skipped" and any(a.kind == "onnx" for a in rec.artifacts):
            out[str(variant)] = name
    return out


def load_spec(root: Path) -> ModelSpec:
    p = Path(root) / SPEC_FILE
    if not p.is_file():
        raise ArtifactError(f"{root} has no {SPEC_FILE}")
    return ModelSpec.from_dict(json.loads(p.read_text(encoding="utf-8")))


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
    def from_artifact(cls, root: str | Path, *, backend: str = "auto", variant: str | None = None,
                      verify: bool = True, providers: Sequence[Any] | None = None, allow_fallback: bool = False,
                      truncation: str | Truncation = Truncation.TRUNCATE, batch_size: int = 32,
                      max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, torch_dtype: str | None = None,
                      device: str = "cpu", session_config: dict[str, str] | None = None,
                      intra_op_threads: int | None = None) -> "Embedder":
        """Open an output dir. ``backend="auto"`` picks TensorRT when an engine and TensorRT are present, else
        ONNX Runtime (CUDA provider when installed, else CPU), else torch; ``info["why"]`` says why.
        ``verify`` checks the sha256 of what is loaded against the manifest. ``session_config`` adds ONNX Runtime
        session entries over the manifest's (e.g. ``{"session.intra_op.allow_spinning": "0"}`` for servers)."""
        root = Path(root)
        if backend not in BACKENDS:
            raise UserInputError(f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
        manifest = Manifest.load(root)
        spec = load_spec(root)
        tok = TextTokenizer.from_dir(root / TOKENIZER_DIR, spec, truncation=Truncation.parse(truncation))
        runner, info = cls._make_runner(root, manifest, spec, backend=backend, variant=variant, verify=verify,
                                        providers=providers, allow_fallback=allow_fallback, torch_dtype=torch_dtype,
                                        device=device, session_config=session_config,
                                        intra_op_threads=intra_op_threads)
        info["verified"] = verify
        log.info("Embedder on %s: backend=%s (%s)", root, info["backend"],
                 ", ".join(f"{k}={v}" for k, v in info.items() if k != "backend"))
        return cls(runner, tok, batch_size=batch_size, max_batch_tokens=max_batch_tokens, info=info)

    @staticmethod
    def _make_runner(root: Path, manifest: Manifest, spec: ModelSpec, *, backend: str, variant: str | None,
                     verify: bool, providers: Sequence[Any] | None, allow_fallback: bool, torch_dtype: str | None,
                     device: str, session_config: dict[str, str] | None = None,
                     intra_op_threads: int | None = None) -> tuple[Runner, dict[str, Any]]:
        variants = onnx_variants(manifest)
        if backend == "auto":
            backend, why = _choose_backend(manifest, variants, variant)
        else:
            why = "requested"
        if backend == "torch":
            from .torch_runner import TorchRunner

            model_dir = Path(manifest.model["local_dir"])
            if verify:
                _verify_model_dir(manifest, model_dir)
            dtype = torch_dtype or manifest.data.get("reference_dtype", "float32")
            return (TorchRunner(model_dir, spec, dtype=dtype, device=device),
                    {"backend": "torch", "dtype": dtype, "why": why})
        if backend == "tensorrt":
            from .tensorrt_runner import TensorRTRunner  # added by the engine stage

            return TensorRTRunner.from_manifest(manifest, verify=verify), {"backend": "tensorrt", "why": why}
        if not variants:
            raise ArtifactError(f"{root} has no ONNX model: run `sfr-export export` first")
        providers = list(providers) if providers else _default_providers()
        cuda = "CUDAExecutionProvider" in [p if isinstance(p, str) else p[0] for p in providers]
        if variant is None:
            order = CUDA_VARIANT_ORDER if cuda else CPU_VARIANT_ORDER
            variant = next((v for v in order if v in variants), sorted(variants)[0])
            why = f"{why}; variant {variant}: " + ("fastest on CUDA" if cuda else "highest fidelity on CPU")
        if variant not in variants:
            raise ArtifactError(f"{root} has no '{variant}' ONNX variant (have: {', '.join(sorted(variants))})")
        stage = variants[variant]
        if verify:
            manifest.verify_stage(stage)
        from .ort_runner import OrtRunner

        rec = manifest.stage(stage)
        if rec is None:  # pragma: no cover - onnx_variants only lists recorded stages
            raise ArtifactError(f"{root} lost stage '{stage}' while loading")
        session_config = {**dict(rec.config.get("ort_session_config", {}) or {}), **dict(session_config or {})}
        # The CPU provider runs the export's GroupQueryAttention form when the stage wrote one (see export_graph).
        form = "onnx-cpu" if not cuda and any(a.kind == "onnx-cpu" for a in rec.artifacts) else "onnx"
        runner = OrtRunner(manifest.artifact_path(stage, form), providers=providers,
                           session_config=session_config, allow_fallback=allow_fallback,
                           intra_op_threads=intra_op_threads)
        return runner, {"backend": "onnxruntime", "variant": variant, "why": why, "stage": stage, "form": form}

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
        vocab = self.vocab_size
        for i, s in enumerate(seqs):
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
        if len(seqs) == 0:
            raise UserInputError("no inputs to embed: the input list is empty")
        if check:
            self.check_ids(seqs)
        out: np.ndarray | None = None
        mbt = max_batch_tokens if max_batch_tokens is not None else self.max_batch_tokens
        for batch in length_batches(seqs, self.tokenizer, batch_size=batch_size or self.batch_size,
                                    max_batch_tokens=mbt):
            emb = self._infer(batch, on_batch)
            if out is None:
                out = np.empty((len(seqs), emb.shape[1]), dtype=np.float32)
            out[batch.indices] = emb
        if out is None:  # pragma: no cover - length_batches yields at least one batch for non-empty input
            raise ArtifactError("runner produced no output")
        return out

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


def _default_providers() -> list[str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _choose_backend(manifest: Manifest, variants: dict[str, str], variant: str | None) -> tuple[str, str]:
    """The best backend this machine can run for this artifact, and why."""
    if variant is None and _tensorrt_ready(manifest):
        return "tensorrt", "auto: a TensorRT engine is recorded and TensorRT is installed"
    if variants:
        from .._optional import available

        if not available("onnxruntime"):
            raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime (or the [gpu] extra)")
        return "onnxruntime", "auto: ONNX model present, no usable TensorRT engine"
    if variant is not None:
        raise ArtifactError(f"{manifest.root} has no ONNX model, so no '{variant}' variant")
    local = manifest.model.get("local_dir")
    if local and Path(local).is_dir():
        return "torch", "auto: no ONNX model in the artifact; the torch reference model dir is present"
    raise ArtifactError(f"{manifest.root} has no ONNX model and its model dir {local} is gone: run `sfr-export export`")


def _verify_model_dir(manifest: Manifest, model_dir: Path) -> None:
    from ..models.loading import fingerprint

    want = manifest.model.get("fingerprint")
    if not model_dir.is_dir():
        raise ArtifactError(f"the torch backend needs the model dir {model_dir}, which is gone")
    if want and fingerprint(model_dir) != want:
        raise ChecksumMismatchError(f"model dir {model_dir} no longer matches the manifest fingerprint {str(want)[:12]}…: "
                                    "the weights changed since export")


def _tensorrt_ready(manifest: Manifest) -> bool:
    rec = manifest.stage("engine")
    if rec is None or rec.status != "ok":
        return False
    from .._optional import available

    return available("tensorrt") or available("tensorrt_lean")


def embedder_for_model(model_dir: Path, spec: ModelSpec, *, dtype: str = "float32", device: str = "cpu",
                       model: Any = None, **kw: Any) -> Embedder:
    """A torch-backed Embedder straight from a model dir (no artifact dir): the reference side of validation."""
    from ..models import load_tokenizer
    from .torch_runner import TorchRunner

    tok = TextTokenizer(load_tokenizer(model_dir), spec)
    return Embedder(TorchRunner(model_dir, spec, dtype=dtype, device=device, model=model), tok,
                    info={"backend": "torch", "dtype": dtype}, **kw)
