"""The FastAPI app: ``POST /v1/embeddings`` (OpenAI schema), ``GET /health``, ``/ready``, ``/metrics``.

FastAPI, uvicorn and prometheus_client come from the ``[serve]`` extra and are imported only here. (No
``from __future__ import annotations``: FastAPI must see the real ``Request`` class of the handler's annotation.)
"""

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._optional import require
from ..errors import SfrExportError, UserInputError
from ..runtime.embedder import Embedder
from ..tokenization import Truncation
from .batching import BatchingConfig, BatchQueue
from .metrics import ServerMetrics
from .protocol import ApiError, EmbeddingRequest, Limits, bad_request, embedding_response, error_body, parse_request

log = logging.getLogger(__name__)

DEFAULT_MAX_INPUTS = 2048


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model_name: str | None = None  # the `model` echoed in responses; default: the manifest's model id
    truncation: str = "error"  # error: over-long text inputs get 400; truncate: cut to the model's max length
    max_inputs: int | None = None  # inputs per request; None: min(2048, the queue bound). Never above the queue bound
    max_input_chars: int = 100_000
    max_request_bytes: int = 2 * 1024 * 1024
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    shutdown_timeout_s: float = 30.0
    log_level: str = "warning"

    def __post_init__(self) -> None:
        Truncation.parse(self.truncation)
        if not 0 <= self.port <= 65535:
            raise UserInputError(f"port must be in 0..65535, got {self.port}")
        queue = self.batching.max_queue_inputs
        if self.max_inputs is None:
            object.__setattr__(self, "max_inputs", min(DEFAULT_MAX_INPUTS, queue))
        elif self.max_inputs < 1:
            raise UserInputError(f"--max-inputs must be >= 1, got {self.max_inputs}")
        elif self.max_inputs > queue:  # such a request could never be queued: it would get 429 forever
            raise UserInputError(f"--max-inputs {self.max_inputs} is over --max-queue {queue}: a request that large "
                                 "could never be queued; lower --max-inputs or raise --max-queue")

    @property
    def inputs_per_request(self) -> int:
        assert self.max_inputs is not None  # set by __post_init__
        return self.max_inputs


class _State:
    def __init__(self, embedder: Embedder, config: ServeConfig, model_name: str):
        self.embedder = embedder
        self.config = config
        self.model_name = model_name
        self.metrics = ServerMetrics()
        self.limits = Limits(max_inputs=config.inputs_per_request, max_input_tokens=embedder.spec.max_length,
                             max_input_chars=config.max_input_chars, max_request_bytes=config.max_request_bytes)
        self.queue = BatchQueue(embedder, config.batching, on_batch=self.metrics.observe_batch,
                                on_depth=self.metrics.queue_depth.set, on_group=self.metrics.observe_group)
        self.ready = False


def create_app(embedder: Embedder, config: "ServeConfig | None" = None, *, model_name: "str | None" = None) -> Any:
    """A FastAPI app serving ``embedder``. The batching worker starts with the app's lifespan and drains on exit."""
    fastapi = require("fastapi", purpose="the embedding server")
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    state = _State(embedder, config, model_name or config.model_name or "sfr-export")
    app = fastapi.FastAPI(title="sfr-export embeddings", lifespan=_lifespan(state), docs_url=None, redoc_url=None)
    app.state.sfr = state

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Any, exc: StarletteHTTPException) -> Any:
        return JSONResponse(error_body(str(exc.detail), type="invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    _add_info_routes(app, state)
    _add_embeddings_route(app, state)
    return app


def _lifespan(state: _State) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        state.queue.start()
        await state.embedder.aencode(["warm-up"])  # first-call allocations happen before /ready says yes
        state.ready = True
        log.info("serving %s (%s) with %s", state.model_name, state.embedder.info.get("backend"),
                 state.config.batching)
        try:
            yield
        finally:
            state.ready = False
            await state.queue.close()  # refuse new work, finish what is queued
            log.info("batching queue drained")

    return lifespan


def _add_info_routes(app: Any, state: _State) -> None:
    """/health, /ready, /metrics and /v1/models."""
    from fastapi.responses import JSONResponse, Response

    @app.get("/health")
    async def health() -> Any:
        alive = state.queue.running or not state.ready
        return JSONResponse({"status": "ok" if alive else "batch worker stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready() -> Any:
        ok = state.ready and state.queue.running
        return JSONResponse({"ready": ok, "model": state.model_name, "backend": state.embedder.info.get("backend"),
                             "variant": state.embedder.info.get("variant")}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "owned_by": "sfr-export"}]}


def _add_embeddings_route(app: Any, state: _State) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response

    def error_response(err: ApiError) -> Any:
        state.metrics.errors.labels(code=err.code or str(err.status)).inc()
        headers = {"Retry-After": "1"} if err.status in (429, 503) else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        t0 = time.perf_counter()
        state.metrics.in_flight.inc()
        try:
            result = await _handle(state, request)
            status = 200
        except ApiError as err:
            result, status = error_response(err), err.status
        finally:
            state.metrics.in_flight.dec()
        state.metrics.requests.labels(code=str(status)).inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
        return result if status != 200 else Response(result, media_type="application/json")


async def _read_body(request: Any, limit: int) -> bytes:
    too_big = ApiError(413, f"request body is over the limit of {limit} bytes", param=None, code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _tokenize(state: _State, req: EmbeddingRequest) -> tuple[list[list[int]], int]:
    """Text inputs -> token ids with the request's prompt; returns (ids, how many were truncated)."""
    emb = state.embedder
    assert req.texts is not None
    side = req.input_type or "query"
    prompt = req.prompt
    if req.input_type == "query" and prompt is None and req.instruction is None:
        prompt = "web_search"  # what Embedder.encode_queries does
    try:
        enc = emb.tokenize(req.texts, prompt=prompt, instruction=req.instruction, side=side,
                           truncation=state.config.truncation)
    except UserInputError as exc:
        msg = str(exc)
        code = "context_length_exceeded" if "over the limit" in msg else "invalid_prompt" if "prompt" in msg else "invalid_input"
        raise bad_request(msg, param="prompt" if code == "invalid_prompt" else "input", code=code) from None
    return enc.ids, enc.truncated


async def _handle(state: _State, request: Any) -> bytes:
    if not state.ready or not state.queue.running:
        raise ApiError(503, "server is not ready (starting up or shutting down)", type="server_error", code="unavailable")
    raw = await _read_body(request, state.limits.max_request_bytes)
    req = parse_request(raw, state.limits)
    if req.dimensions is not None and req.dimensions != state.embedder.dim:
        raise bad_request(f"this model returns {state.embedder.dim} dimensions; 'dimensions'={req.dimensions} is not supported",
                          param="dimensions", code="invalid_dimensions")
    if req.token_ids is not None:
        try:
            state.embedder.check_ids(req.token_ids)
        except SfrExportError as exc:
            raise bad_request(str(exc), code="invalid_token_id") from None
        seqs, truncated = req.token_ids, 0
    else:
        seqs, truncated = await asyncio.to_thread(_tokenize, state, req)
    emb = await state.queue.submit(seqs)
    n_tokens = sum(len(s) for s in seqs)
    state.metrics.inputs.inc(len(seqs))
    state.metrics.tokens.inc(n_tokens)
    if truncated:
        state.metrics.truncated.inc(truncated)
    return embedding_response(emb, encoding_format=req.encoding_format, model=state.model_name, prompt_tokens=n_tokens)


# A server shares its cores with the HTTP loop: ONNX Runtime's spinning worker threads would starve it.
SERVER_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


@dataclass(frozen=True)
class EmbedderOptions:
    backend: str = "auto"
    variant: str | None = None
    verify: bool = True
    session_config: dict = field(default_factory=lambda: dict(SERVER_SESSION_CONFIG))


def run_server(directory: Path, config: ServeConfig, options: EmbedderOptions = EmbedderOptions()) -> None:
    """Load the artifact and serve it with uvicorn until SIGINT/SIGTERM; the queue drains before exit."""
    uvicorn = require("uvicorn", purpose="the embedding server")
    from ..artifact import Manifest

    # Tokenization runs under the Embedder's lock in worker threads; the tokenizers library's own rayon pool would
    # only compete with ONNX Runtime for the same cores, and its per-thread malloc arenas raise RSS by tens of MB
    # (measured: benchmarks/bench_memory_flat.py). An explicit user setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    manifest = Manifest.load(directory)
    embedder = Embedder.from_artifact(directory, backend=options.backend, variant=options.variant,
                                      verify=options.verify, truncation=config.truncation,
                                      batch_size=config.batching.max_batch_size,
                                      max_batch_tokens=config.batching.max_batch_tokens,
                                      session_config=options.session_config)
    name = config.model_name or str(manifest.model.get("id", "sfr-export"))
    app = create_app(embedder, config, model_name=name)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                           timeout_graceful_shutdown=config.shutdown_timeout_s, access_log=False))
    log.info("sfr-export serving %s on http://%s:%d (backend %s)", name, config.host, config.port,
             embedder.info.get("backend"))
    try:
        server.run()
    finally:
        embedder.close()
