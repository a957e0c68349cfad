"""The server's Prometheus metrics, in a registry of their own (several apps in one process do not mix counts).

- ``vitlab_requests_total{endpoint, status}`` and ``vitlab_request_errors_total{endpoint, status}`` (status >= 400)
- ``vitlab_request_duration_seconds{endpoint}``: latency histogram, from the first byte read to the last one sent
- ``vitlab_images_total{endpoint}``: images answered
- ``vitlab_batch_size``, ``vitlab_batch_duration_seconds``: images per model call and its time
- ``vitlab_queue_length``: images waiting for the model now
- ``vitlab_model_info{name, backend, device}``
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/classify", "/v1/explain", "/v1/model")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def endpoint_label(path: str) -> str:
    """The endpoint a path counts under: one of :data:`ENDPOINTS`, or ``other`` (so that scans of random paths do not
    create a time series each)."""
    return path if path in ENDPOINTS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vitlab_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("vitlab_request_errors", "HTTP requests answered with an error status (>= 400)",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("vitlab_request_duration_seconds", "time from request to the end of the answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("vitlab_images", "images answered", ["endpoint"], registry=r)
        self.batch_size = Histogram("vitlab_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_duration = Histogram("vitlab_batch_duration_seconds", "time of one model call",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("vitlab_queue_length", "images waiting for a model call", registry=r)
        self.info = Info("vitlab_model", "the model being served", registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
