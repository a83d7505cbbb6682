"""The OpenAI ``/v1/embeddings`` wire format: request parsing with limits, response and error bodies.

Parsing is done by hand (not by a pydantic model) so that every bad request gets an OpenAI-style error body
(``{"error": {"message", "type", "param", "code"}}``) with the right status code, never FastAPI's 422 shape.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SfrExportError

ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "document")
KNOWN_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user", "prompt", "input_type",
                          "instruction"})


class ApiError(SfrExportError):
    """An error the server answers with ``status`` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = "input", code: str | None = "invalid_input") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """Request limits. ``max_input_tokens`` is the model's max length (set from the spec by the app)."""

    max_inputs: int = 2048
    max_input_tokens: int = 512
    max_input_chars: int = 100_000  # refused before tokenization so one input can't hold the tokenizer for long
    max_request_bytes: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_inputs", "max_input_tokens", "max_input_chars", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ApiError(500, f"{name} must be >= 1", type="server_error")


@dataclass
class EmbeddingRequest:
    texts: list[str] | None = None  # exactly one of texts / token_ids is set
    token_ids: list[list[int]] | None = None
    model: str | None = None
    encoding_format: str = "float"
    prompt: str | None = None
    input_type: str | None = None
    instruction: str | None = None
    dimensions: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_inputs(self) -> int:
        return len(self.texts if self.texts is not None else self.token_ids or [])


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise bad_request(f"'{key}' must be a string or null, got {type(v).__name__}", param=key, code="invalid_type")
    return v


def parse_request(raw: bytes, limits: Limits) -> EmbeddingRequest:
    """Bytes of a POST body -> a validated request, or an ApiError (400) naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", param=None, code="invalid_encoding") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          param=None, code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"request body must be a JSON object, got {type(obj).__name__}", param=None, code="invalid_type")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0],
                          code="unknown_parameter")
    if "input" not in obj:
        raise bad_request("'input' is required", code="missing_input")
    req = EmbeddingRequest(model=_opt_str(obj, "model"), prompt=_opt_str(obj, "prompt"),
                           instruction=_opt_str(obj, "instruction"))
    fmt = obj.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ENCODING_FORMATS:
        raise bad_request(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got {fmt!r}",
                          param="encoding_format", code="invalid_encoding_format")
    req.encoding_format = fmt
    input_type = obj.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise bad_request(f"input_type must be 'query', 'document' or null, got {input_type!r}", param="input_type",
                          code="invalid_input_type")
    req.input_type = input_type
    if req.prompt is not None and req.instruction is not None:
        raise bad_request("give either 'prompt' or 'instruction', not both", param="prompt", code="conflicting_parameters")
    dims = obj.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims < 1):
        raise bad_request(f"'dimensions' must be a positive integer, got {dims!r}", param="dimensions", code="invalid_type")
    req.dimensions = dims
    if obj.get("user") is not None and not isinstance(obj["user"], str):
        raise bad_request("'user' must be a string", param="user", code="invalid_type")
    _parse_input(obj["input"], req, limits)
    if req.token_ids is not None and (req.prompt is not None or req.instruction is not None or req.input_type):
        raise bad_request("'prompt', 'instruction' and 'input_type' apply to text input only, not to token ids",
                          param="prompt", code="conflicting_parameters")
    return req


def _parse_input(inp: Any, req: EmbeddingRequest, limits: Limits) -> None:
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list):
        raise bad_request(f"'input' must be a string, a list of strings, or token-id arrays; got {type(inp).__name__}",
                          code="invalid_type")
    if not inp:
        raise bad_request("'input' is empty: give at least one input", code="empty_input")
    if len(inp) > limits.max_inputs:
        raise bad_request(f"'input' has {len(inp)} items, over the limit of {limits.max_inputs} per request",
                          code="too_many_inputs")
    if all(isinstance(x, str) for x in inp):
        for i, t in enumerate(inp):
            if not t.strip():
                raise bad_request(f"input {i} is empty or whitespace only", code="empty_input")
            if len(t) > limits.max_input_chars:
                raise bad_request(f"input {i} has {len(t)} characters, over the limit of {limits.max_input_chars}",
                                  code="input_too_long")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"input {i} is not valid Unicode (lone surrogate)", code="invalid_encoding") from None
        req.texts = inp
        return
    if all(_is_int(x) for x in inp):  # one token array
        inp = [inp]
    if not all(isinstance(s, list) for s in inp):
        raise bad_request("'input' mixes types: give all strings, one token-id array, or a list of token-id arrays",
                          code="invalid_type")
    for i, s in enumerate(inp):
        if not s:
            raise bad_request(f"input {i} is an empty token array", code="empty_input")
        if not all(_is_int(t) for t in s):
            raise bad_request(f"input {i} holds a non-integer token id", code="invalid_type")
        if len(s) > limits.max_input_tokens:
            raise bad_request(f"input {i} has {len(s)} tokens, over the model's limit of {limits.max_input_tokens}",
                              code="context_length_exceeded")
    req.token_ids = inp


def embedding_response(emb: np.ndarray, *, encoding_format: str, model: str, prompt_tokens: int) -> bytes:
    """The OpenAI response body. float32 -> JSON float round-trips exactly; base64 is little-endian float32."""
    if encoding_format == "base64":
        rows: list[Any] = [base64.b64encode(np.ascontiguousarray(r, dtype="<f4").tobytes()).decode("ascii") for r in emb]
    else:
        rows = emb.tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": r} for i, r in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def decode_embedding(item: Any, encoding_format: str) -> np.ndarray:
    """Client side: one ``data[i]["embedding"]`` back to float32."""
    if encoding_format == "base64":
        return np.frombuffer(base64.b64decode(item), dtype="<f4").astype(np.float32)
    return np.asarray(item, dtype=np.float32)
