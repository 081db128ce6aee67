"""Prometheus collectors, one registry per app so tests and multiple apps never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """All of rerankd's metrics; created once and passed to the layers that record them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def per_model(kind, name: str, doc: str, **buckets):
            return kind(name, doc, ["model"], registry=r, **buckets)

        def latency(name: str, doc: str, label: str = "model") -> Histogram:
            return Histogram(name, doc, [label], buckets=_LATENCY_BUCKETS, registry=r)

        self.requests = Counter(
            "rerankd_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = latency(
            "rerankd_request_seconds", "End-to-end request latency", "route"
        )
        self.documents = per_model(Counter, "rerankd_documents", "Documents (pairs) scored")
        self.tokens = per_model(Counter, "rerankd_tokens", "Tokens scored (prompt tokens)")
        self.truncated = per_model(
            Counter, "rerankd_truncated_documents", "Documents cut to fit the model's limit"
        )
        self.tokenize_time = latency("rerankd_tokenize_seconds", "Time to tokenize a request")
        self.queue_time = latency(
            "rerankd_queue_seconds", "Time a request waited before its first batch ran"
        )
        self.inference_time = latency("rerankd_batch_inference_seconds", "Engine time per batch")
        self.batch_pairs = per_model(
            Histogram, "rerankd_batch_pairs", "Pairs per engine batch", buckets=_BATCH_BUCKETS
        )
        self.batch_tokens = per_model(
            Histogram,
            "rerankd_batch_tokens",
            "Tokens per engine batch",
            buckets=tuple(2**i for i in range(6, 19)),
        )
        self.rejected = per_model(
            Counter, "rerankd_rejected_requests", "Requests refused because the queue was full"
        )
        self.failures = Counter(
            "rerankd_failures",
            "Failures by kind (validation, inference, ...)",
            ["kind"],
            registry=r,
        )
        self.queued_tokens = per_model(
            Gauge, "rerankd_queued_tokens", "Tokens waiting in the scheduler"
        )
