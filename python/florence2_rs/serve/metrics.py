"""The server's Prometheus metrics, in a registry of their own (one per app, so that several apps in one
process, as in tests or Ray replicas, do not share counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Seconds buckets for queue and request times: from a tiny model's milliseconds to a large one's minute.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The counters, gauges and histograms the engine and the app update.

    Attributes:
        waiting: requests admitted and not yet started.
        running: requests whose tasks are being generated.
        requests: finished requests by endpoint, task (one count per task of a request) and HTTP status.
        queue_seconds: time from admission to the start of a request's first batch.
        request_seconds: time from admission to the answer, by endpoint.
        batch_size: rows (image × task) per generate call; its sum is the number of rows run.
        images: images through the vision tower (once per request, whatever the number of its tasks).
        batch_retries: batches that failed and were run again row by row.
        rejections: requests refused, by reason (queue_full, body_too_large, image_too_large, invalid_image,
            invalid_request, draining, timeout, disconnected, loading).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.waiting = Gauge("florence2_requests_waiting", "Requests admitted and waiting for the model", registry=r)
        self.running = Gauge("florence2_requests_running", "Requests being run by the model", registry=r)
        self.requests = Counter("florence2_requests", "Finished requests (one count per task of a request)",
                                ["endpoint", "task", "status"], registry=r)
        self.queue_seconds = Histogram("florence2_request_queue_seconds", "Time from admission to the first batch",
                                       buckets=_SECONDS, registry=r)
        self.request_seconds = Histogram("florence2_request_seconds", "Time from admission to the answer",
                                         ["endpoint"], buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("florence2_batch_size", "Rows (image x task) per generate call",
                                    buckets=_BATCH, registry=r)
        self.images = Counter("florence2_images", "Images through the vision tower", registry=r)
        self.batch_retries = Counter("florence2_batch_retries", "Batches run again row by row after a failure",
                                     registry=r)
        self.rejections = Counter("florence2_rejections", "Requests refused, by reason", ["reason"], registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
