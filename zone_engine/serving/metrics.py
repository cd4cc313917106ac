"""Prometheus metrics of one service instance, in a registry of its own (several apps per process
in tests; one per replica under Ray)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..pipeline import STAGES

OUTCOMES = ("ok", "bad_request", "queue_full", "timeout", "cancelled", "unavailable", "out_of_memory", "error")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("zone_requests", "Edit requests by outcome", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome visible from the start, at 0
        self.latency = Histogram("zone_request_seconds", "End-to-end latency of answered edits",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("zone_queue_wait_seconds", "Time an edit waited before its batch started",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage = Histogram("zone_stage_seconds", "Seconds per pipeline stage of finished edits", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("zone_batch_size", "Edits per batch run", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("zone_queue_depth", "Edits waiting for a batch", registry=self.registry)
        self.running = Gauge("zone_running", "Edits in the batch being run", registry=self.registry)

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage).observe(timings[stage])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
