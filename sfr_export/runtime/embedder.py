"""``Embedder``: one API over the torch, onnxruntime and tensorrt runners of an output dir."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, UserInputError
from ..manifest import Manifest
from ..spec import ModelSpec
from ..tokenization import Encoded, TextTokenizer, Truncation, length_batches, validate_texts
from .runner import Runner

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "torch", "tensorrt")
SPEC_FILE = "spec.json"
TOKENIZER_DIR = "tokenizer"


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
                 max_batch_tokens: int | None = None, info: dict[str, Any] | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.spec = tokenizer.spec
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.info = dict(info or {})
        self._tok_lock = threading.Lock()
        runner.activate()

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_artifact(cls, root: str | Path, *, backend: str = "auto", variant: str | None = None,
                      verify: bool = True, providers: Sequence[Any] | None = None, allow_fallback: bool = False,
                      truncation: str | Truncation = Truncation.TRUNCATE, batch_size: int = 32,
                      max_batch_tokens: int | None = None, torch_dtype: str | None = None,
                      device: str = "cpu") -> "Embedder":
        root = Path(root)
        if backend not in BACKENDS:
            raise UserInputError(f"unknown backend '{backend}' (expected one of {', '.join(BACKENDS)})")
        manifest = Manifest.load(root)
        spec = load_spec(root)
        tok = TextTokenizer.from_dir(root / TOKENIZER_DIR, spec, truncation=Truncation(truncation))
        runner, info = cls._make_runner(root, manifest, spec, backend=backend, variant=variant, verify=verify,
                                        providers=providers, allow_fallback=allow_fallback, torch_dtype=torch_dtype,
                                        device=device)
        log.info("Embedder on %s: backend=%s %s", root, runner.name, info)
        return cls(runner, tok, batch_size=batch_size, max_batch_tokens=max_batch_tokens, info=info)

    @staticmethod
    def _make_runner(root: Path, manifest: Manifest, spec: ModelSpec, *, backend: str, variant: str | None,
                     verify: bool, providers: Sequence[Any] | None, allow_fallback: bool, torch_dtype: str | None,
                     device: str) -> tuple[Runner, dict[str, Any]]:
        if backend == "torch":
            from .torch_runner import TorchRunner

            model_dir = Path(manifest.model["local_dir"])
            dtype = torch_dtype or manifest.data.get("reference_dtype", "float32")
            return TorchRunner(model_dir, spec, dtype=dtype, device=device), {"backend": "torch", "dtype": dtype}
        if backend == "tensorrt" or (backend == "auto" and variant is None and _tensorrt_ready(manifest)):
            from .tensorrt_runner import TensorRTRunner  # added by the engine stage

            return TensorRTRunner.from_manifest(manifest, verify=verify), {"backend": "tensorrt"}
        variants = onnx_variants(manifest)
        if not variants:
            raise ArtifactError(f"{root} has no ONNX model: run `sfr-export export` first")
        if variant is None:
            variant = next((v for v in ("fp32", "fp16", "int8") if v in variants), sorted(variants)[0])
            reason = "auto: highest-fidelity ONNX variant present" if backend == "auto" else "default variant"
        else:
            reason = "requested"
        if variant not in variants:
            raise ArtifactError(f"{root} has no '{variant}' ONNX variant (have: {', '.join(sorted(variants))})")
        stage = variants[variant]
        if verify:
            manifest.verify_stage(stage)
        from .ort_runner import OrtRunner

        rec = manifest.stage(stage)
        assert rec is not None
        session_config = dict(rec.config.get("ort_session_config", {}) or {})
        runner = OrtRunner(manifest.artifact_path(stage, "onnx"), providers=providers or ("CPUExecutionProvider",),
                           session_config=session_config, allow_fallback=allow_fallback)
        return runner, {"backend": "onnxruntime", "variant": variant, "why": reason, "stage": stage}

    # ---- encoding ------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str] | str, *, prompt: str | None = None, instruction: str | None = None,
                 side: str = "query") -> Encoded:
        texts = validate_texts(texts)
        formatted = self.spec.apply_prompt(texts, prompt, instruction=instruction, side=side)
        with self._tok_lock:
            return self.tokenizer.encode(formatted)

    def encode_ids(self, seqs: Sequence[Sequence[int]], *, batch_size: int | None = None,
                   max_batch_tokens: int | None = None) -> np.ndarray:
        """Embed already-tokenized sequences (as produced by ``tokenize``) in caller order."""
        if len(seqs) == 0:
            raise UserInputError("no inputs to embed: the input list is empty")
        out: np.ndarray | None = None
        for batch in length_batches(seqs, self.tokenizer, batch_size=batch_size or self.batch_size,
                                    max_batch_tokens=max_batch_tokens if max_batch_tokens is not None else self.max_batch_tokens):
            emb = self.runner.infer(batch.input_ids, batch.attention_mask)
            if out is None:
                out = np.empty((len(seqs), emb.shape[1]), dtype=np.float32)
            out[batch.indices] = emb
        assert out is not None
        return out

    def encode(self, texts: Sequence[str] | str, *, prompt: str | None = None, instruction: str | None = None,
               batch_size: int | None = None, max_batch_tokens: int | None = None, side: str = "query") -> np.ndarray:
        """Embed ``texts`` (float32 [n, dim], L2-normalised when the spec says so), in input order."""
        enc = self.tokenize(texts, prompt=prompt, instruction=instruction, side=side)
        return self.encode_ids(enc.ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens)

    def encode_queries(self, texts: Sequence[str], *, task: str | None = None, instruction: str | None = None,
                       **kw: Any) -> np.ndarray:
        if task is None and instruction is None:
            task = "web_search"
        return self.encode(texts, prompt=task, instruction=instruction, side="query", **kw)

    def encode_documents(self, texts: Sequence[str], *, task: str | None = None, **kw: Any) -> np.ndarray:
        return self.encode(texts, prompt=task, side="document", **kw)

    async def aencode(self, texts: Sequence[str] | str, **kw: Any) -> np.ndarray:
        """Async wrapper: runs ``encode`` in a worker thread."""
        return await asyncio.to_thread(self.encode, texts, **kw)

    @property
    def dim(self) -> int:
        return int(self.encode(["dimension probe"]).shape[1])

    def close(self) -> None:
        self.runner.deactivate()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
