"""Prometheus metrics: base units, counters end in `_total`, bounded labels (never an id)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess() -> bool:
    """Several worker processes share one metrics directory (`bbqrec serve --workers N` sets
    PROMETHEUS_MULTIPROC_DIR before starting them; prometheus-client reads it at import)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """All service metrics, registered in one registry (a fresh one per app in tests). With
    several workers each process writes its values to the shared directory, and any of them
    answers /metrics with the sum over all (`exposition`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "bbqrec_http_requests_total",
            "HTTP requests.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "bbqrec_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "bbqrec_queue_wait_seconds",
            "Time a recommendation waited for its batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "bbqrec_inference_seconds",
            "ONNX Runtime time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.redis = Histogram(
            "bbqrec_redis_seconds",
            "Redis time per request.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "bbqrec_batch_size",
            "Requests per inference batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.cold_start = Counter(
            "bbqrec_cold_start_total",
            "Recommendations for users with no history.",
            registry=registry,
        )
        self.unknown_items = Counter(
            "bbqrec_unknown_items_total",
            "Unknown item ids seen in requests or stored histories.",
            ["source"],
            registry=registry,
        )
        self.degraded = Counter(
            "bbqrec_degraded_total",
            "Answers served in a degraded mode (e.g. popularity while Redis is unavailable).",
            ["reason"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "bbqrec_redis_errors_total",
            "Redis operations that failed or ran past the time budget.",
            ["operation"],
            registry=registry,
        )
        self.items_added = Counter(
            "bbqrec_items_added_total", "Items added at serving time.", registry=registry
        )
        self.items_synced = Counter(
            "bbqrec_items_synced_total",
            "Items added at serving time on another replica, taken into this one's catalogue.",
            registry=registry,
        )
        self.items_requantized = Counter(
            "bbqrec_items_requantized_total",
            "Items added under a bundle of another tokenizer, given a SID in this bundle's "
            "codebooks from what they were added from (text, vectors).",
            registry=registry,
        )
        self.items_unplaced = Counter(
            "bbqrec_items_unplaced_total",
            "Items added under a bundle of another tokenizer that this bundle cannot quantize "
            "(a modality it needs is missing or of another dimension, or their SID prefix is "
            "full); not recommendable under this bundle.",
            registry=registry,
        )
        self.model_info = Gauge(
            "bbqrec_model_info",
            "The served model (value 1).",
            ["version", "provider"],
            registry=registry,
            multiprocess_mode="liveall",  # one series per live worker: each names its model
        )

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or all workers' together."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))

    def close(self) -> None:
        """A worker leaving: its live gauges go (counters and histograms keep their counts)."""
        if multiprocess():
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def observe_batch(self, size: int, waits: list[float], inference_s: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(inference_s)
        for wait in waits:
            self.queue_wait.observe(wait)
