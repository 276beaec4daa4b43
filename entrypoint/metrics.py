"""Metrics: what operators monitor, in Prometheus format, for `/v1/metrics`.

Counters and histograms are fed by the reconciler and the gateway; adapter states are read from
the registry at scrape time. Holds no other state and does no I/O (the backend's own metrics are
fetched by the gateway and appended).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from entrypoint.fetches import FETCHES, FetchLog
from entrypoint.reconcile.registry import Registry, State, Traffic

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
        loaded = GaugeMetricFamily(
            "lora_adapter_loaded", "1 for each adapter this replica's backend holds and serves "
            "(vLLM's lora_requests_info lists only adapters with requests in flight).",
            labels=["adapter"])
        for record in self.registry.records():
            if record.state is State.READY:
                ready.add_metric([record.name], 1)
            if record.servable:
                loaded.add_metric([record.name], 1)
        yield ready
        yield loaded


class LoraRequestsInfo(Collector):
    """vLLM's `vllm:lora_requests_info` for a backend that has none (SGLang), made from the
    requests the gateway holds: running = adapters with requests in flight, waiting = adapters
    with requests held at their gate. Same labels and meaning as vLLM's, so a fleet router (the
    llm-d endpoint picker) can route by LoRA affinity; the value is the time, as in vLLM."""

    def __init__(self, traffic: Traffic, max_lora: int) -> None:
        self.traffic = traffic
        self.max_lora = max_lora

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting = self.traffic.busy()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        family.add_metric([str(self.max_lora), ",".join(running), ",".join(waiting)],
                          time.time())
        yield family


class _Fetches(Collector):
    """The downloads of adapter files (`s3://`, `hf://`): ended, their bytes and time, and
    those under way, read from the fetch log at scrape time."""

    def __init__(self, fetches: FetchLog) -> None:
        self.fetches = fetches

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | SummaryMetricFamily]:
        totals = self.fetches.totals()
        ended = CounterMetricFamily("lora_adapter_fetches", "Adapter downloads that ended, by "
                                    "result (ok: every file there; failed: retried later).",
                                    labels=["result"])
        ended.add_metric(["ok"], totals.succeeded)
        ended.add_metric(["failed"], totals.failed)
        yield ended
        yield CounterMetricFamily("lora_adapter_fetch_bytes",
                                  "Bytes of adapter files downloaded.", value=totals.bytes)
        yield SummaryMetricFamily("lora_adapter_fetch_seconds",
                                  "Time each adapter download took.",
                                  count_value=totals.succeeded + totals.failed,
                                  sum_value=totals.seconds)
        yield GaugeMetricFamily("lora_adapter_fetches_running", "Adapter downloads under way.",
                                value=totals.running)


class Metrics:
    """The entrypoint's own metrics (`lora_*`)."""

    def __init__(self, registry: Registry, *, lora_info: LoraRequestsInfo | None = None,
                 fetches: FetchLog = FETCHES) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_AdapterStates(registry))
        self.collectors.register(_Fetches(fetches))
        if lora_info is not None:
            self.collectors.register(lora_info)
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
