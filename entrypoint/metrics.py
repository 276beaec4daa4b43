"""Metrics: what operators monitor, in Prometheus format, for `/v1/metrics`.

Counters and histograms are fed by the reconciler and the gateway; adapter states are read from
the registry at scrape time. Holds no other state and does no I/O (the backend's own metrics are
fetched by the gateway and appended).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .registry import Registry, State

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _AdapterStates(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("lora_adapters", "Adapter folders by state.",
                                   labels=["state"])
        for state, count in self.registry.counts().items():
            family.add_metric([state], count)
        yield family
        ready = GaugeMetricFamily("lora_adapter_ready", "1 for each adapter ready to serve.",
                                  labels=["adapter"])
        for record in self.registry.records():
            if record.state is State.READY:
                ready.add_metric([record.name], 1)
        yield ready


class Metrics:
    """The entrypoint's own metrics (`lora_*`)."""

    def __init__(self, registry: Registry) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_AdapterStates(registry))
        r = self.collectors
        self.loads = Counter("lora_adapter_loads", "Adapter loads that succeeded.",
                             ["kind"], registry=r)
        self.unloads = Counter("lora_adapter_unloads", "Adapters unloaded.", registry=r)
        self.failures = Counter("lora_adapter_failures", "Adapter problems by reason.",
                                ["reason"], registry=r)
        self.load_seconds = Histogram("lora_adapter_load_seconds",
                                      "Time to snapshot and load one adapter.",
                                      buckets=DURATION_BUCKETS, registry=r)
        self.scan_seconds = Histogram("lora_scan_seconds", "Time to scan the adapter folder.",
                                      buckets=DURATION_BUCKETS, registry=r)
        self.requests = Counter("lora_requests", "Inference requests by adapter ('' = base).",
                                ["adapter"], registry=r)
        self.errors = Counter("lora_request_errors",
                              "Inference requests answered with an error, by adapter and status.",
                              ["adapter", "status"], registry=r)

    def request(self, adapter: str, status: int) -> None:
        self.requests.labels(adapter).inc()
        if status >= 400:
            self.errors.labels(adapter, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.collectors)
