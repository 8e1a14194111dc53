"""The router's Prometheus metrics (prometheus_client, one registry per application)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "staging_router_requests_total",
            "Requests answered by the router, by model and status code.",
            ["model", "code"],
            registry=self.registry,
        )
        self.cold_loads = Counter(
            "staging_router_cold_loads_total",
            "Cold loads finished in this process, by outcome (owner, waiter, failed, interrupted).",
            ["outcome"],
            registry=self.registry,
        )
        self.bytes_staged = Counter(
            "staging_router_bytes_staged_total",
            "Payload bytes this process uploaded to workers.",
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "staging_router_cold_load_seconds",
            "Duration of cold loads (hash, stage, load), seconds.",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )
        self.waiters = Gauge(
            "staging_router_waiting_requests",
            "Requests waiting for a cold load right now.",
            registry=self.registry,
        )
        self.cold_loads_active = Gauge(
            "staging_router_cold_loads_active",
            "Cold-load tasks running in this process.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
