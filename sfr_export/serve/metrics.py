"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from .._optional import require
from ..runtime.embedder import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

# name -> what it measures (the README's metrics list is this table)
METRICS_HELP: dict[str, str] = {
    "sfr_requests_total": "embedding requests answered, by HTTP status code",
    "sfr_request_errors_total": "requests answered with an error, by OpenAI error code",
    "sfr_request_latency_seconds": "request latency from arrival to response (histogram)",
    "sfr_requests_in_flight": "requests being handled now",
    "sfr_inputs_total": "inputs embedded",
    "sfr_tokens_total": "tokens embedded (usage.prompt_tokens)",
    "sfr_truncated_inputs_total": "text inputs truncated to the model's max length",
    "sfr_queue_depth": "inputs waiting in the batching queue",
    "sfr_queue_wait_seconds": "time from enqueue to the start of the group's inference (histogram)",
    "sfr_group_inputs": "inputs per dynamic-batching group (histogram)",
    "sfr_batch_size": "rows per runner call (histogram)",
    "sfr_batch_tokens": "real tokens per runner call (histogram)",
    "sfr_batch_padded_tokens": "padded tokens per runner call (histogram)",
    "sfr_inference_seconds": "runner call duration (histogram)",
}


class ServerMetrics:
    def __init__(self) -> None:
        prom = require("prometheus_client", purpose="the server's /metrics endpoint")
        r = self.registry = prom.CollectorRegistry()
        h = METRICS_HELP
        self.requests = prom.Counter("sfr_requests", h["sfr_requests_total"], ["code"], registry=r)
        self.errors = prom.Counter("sfr_request_errors", h["sfr_request_errors_total"], ["code"], registry=r)
        self.latency = prom.Histogram("sfr_request_latency_seconds", h["sfr_request_latency_seconds"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = prom.Gauge("sfr_requests_in_flight", h["sfr_requests_in_flight"], registry=r)
        self.inputs = prom.Counter("sfr_inputs", h["sfr_inputs_total"], registry=r)
        self.tokens = prom.Counter("sfr_tokens", h["sfr_tokens_total"], registry=r)
        self.truncated = prom.Counter("sfr_truncated_inputs", h["sfr_truncated_inputs_total"], registry=r)
        self.queue_depth = prom.Gauge("sfr_queue_depth", h["sfr_queue_depth"], registry=r)
        self.queue_wait = prom.Histogram("sfr_queue_wait_seconds", h["sfr_queue_wait_seconds"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.group_inputs = prom.Histogram("sfr_group_inputs", h["sfr_group_inputs"], buckets=SIZE_BUCKETS + (1024, 2048),
                                           registry=r)
        self.batch_size = prom.Histogram("sfr_batch_size", h["sfr_batch_size"], buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = prom.Histogram("sfr_batch_tokens", h["sfr_batch_tokens"], buckets=TOKEN_BUCKETS, registry=r)
        self.batch_padded = prom.Histogram("sfr_batch_padded_tokens", h["sfr_batch_padded_tokens"],
                                           buckets=TOKEN_BUCKETS, registry=r)
        self.inference = prom.Histogram("sfr_inference_seconds", h["sfr_inference_seconds"], buckets=LATENCY_BUCKETS,
                                        registry=r)
        self._generate = prom.generate_latest
        self.content_type = prom.CONTENT_TYPE_LATEST

    def observe_batch(self, b: BatchStats) -> None:  # called from the inference thread; prometheus_client is thread-safe
        self.batch_size.observe(b.rows)
        self.batch_tokens.observe(b.tokens)
        self.batch_padded.observe(b.padded_tokens)
        self.inference.observe(b.seconds)

    def observe_group(self, inputs: int, waited_s: float) -> None:
        self.group_inputs.observe(inputs)
        self.queue_wait.observe(waited_s)

    def render(self) -> bytes:
        return self._generate(self.registry)
