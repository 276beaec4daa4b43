"""The fetch log: a download's progress while it runs, long ones logged as they go, totals for
the metrics, and `/v1/adapters` showing the bytes done of the total."""

from __future__ import annotations

import logging
import time

from entrypoint.fetches import FetchLog
from entrypoint.metrics import Metrics
from entrypoint.reconcile.registry import Registry


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


def test_a_long_fetch_says_how_far_it_has_got_and_its_totals_count(caplog):
    fetches = FetchLog(progress_every=0.05)
    caplog.set_level(logging.INFO, logger="entrypoint.fetches")
    fetch = fetches.begin("wide", "s3://bucket/loras/wide", total=40 << 20)
    fetch.add(10 << 20)
    assert fetches.progress("wide") == (10 << 20, 40 << 20)
    wait_for(lambda: "adapter wide: fetching from s3://bucket/loras/wide: 10.0 MiB of "
             "40.0 MiB (25%) after" in caplog.text)
    fetch.add(30 << 20)
    fetches.end(fetch, ok=True)
    assert fetches.progress("wide") is None
    failed = fetches.begin("other", "hf://acme/other@0123456789ab", total=0,
                           measure=lambda: 5 << 20)
    assert fetches.progress("other") == (5 << 20, 0)  # measured: the Hub's client writes it
    fetches.end(failed, ok=False)
    totals = fetches.totals()
    assert (totals.succeeded, totals.failed, totals.bytes, totals.running) == (
        1, 1, 45 << 20, 0)
    assert "fetched 40.0 MiB from s3://bucket/loras/wide in" in caplog.text
    wait_for(lambda: fetches._ticker is None)  # the progress thread ends with the fetches


def test_metrics_count_fetches_bytes_and_those_under_way():
    fetches = FetchLog()
    metrics = Metrics(Registry(), fetches=fetches)
    done = fetches.begin("a", "s3://b/a", total=100)
    done.add(100)
    fetches.end(done, ok=True)
    fetches.begin("b", "s3://b/b", total=100)
    text = metrics.render().decode()
    assert 'lora_adapter_fetches_total{result="ok"} 1.0' in text
    assert 'lora_adapter_fetches_total{result="failed"} 0.0' in text
    assert "lora_adapter_fetch_bytes_total 100.0" in text
    assert "lora_adapter_fetch_seconds_count 1.0" in text
    assert "lora_adapter_fetches_running 1.0" in text
