"""Prometheus metrics of one app (own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mmfuse_requests", "Finished requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mmfuse_prompt_tokens", "Prompt tokens, soft tokens included", registry=r)
        self.generation_tokens = Counter("mmfuse_generation_tokens", "Generated tokens", registry=r)
        self.items = Counter("mmfuse_items", "Embedding items received, by modality", ["modality"], registry=r)
        self.errors = Counter("mmfuse_errors", "Error answers by kind", ["kind"], registry=r)
        self.latency = Histogram("mmfuse_request_latency_seconds", "Request latency (to the last byte for streams)",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("mmfuse_time_to_first_token_seconds", "Streaming: time to the first chunk",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mmfuse_batch_size", "Requests per transformers batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("mmfuse_batch_seconds", "Transformers batch generation time", registry=r,
                                       buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("mmfuse_requests_in_flight", "Requests queued or generating", registry=r)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def batch(self, requests: int, seconds: float) -> None:
        self.batch_size.observe(requests)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI: counts every answer by route and status and times it to its last byte (streams included)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time
        endpoint = scope["path"] if scope["path"] in self.routes else "other"  # bounded label values
        status = 500
        start = time.perf_counter()

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)
