"""A backend that stops answering is not hidden behind a "ready" service: readiness follows its
health route, and after NIM_BACKEND_HEALTH_TIMEOUT_SECS the entrypoint stops it and exits 1."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.server import descendants, find_backend, make_source, tiny_env, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)


def test_a_hung_backend_makes_the_service_unready_then_stops_it(serve_factory, tiny_model,
                                                                library, tmp_path):
    source = make_source(tmp_path, library, {"hung-a": "alpha"})
    server = serve_factory(tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="60",
                                    NIM_BACKEND_HEALTH_TIMEOUT_SECS="6"),
                           name="hung").wait_ready()
    assert server.complete("hung-a")
    family = descendants(server.process.pid)
    vllm = find_backend(server.process.pid)
    os.kill(vllm, signal.SIGSTOP)  # alive, but answers nothing: like a hang in its shutdown
    stopped = time.monotonic()

    def unready() -> bool:
        reply = server.http.get("/v1/health/ready")
        return reply.status_code == 503 and "health check" in reply.json()["message"]

    server.wait_for(unready, timeout=15, what="readiness follows the backend")
    code = server.process.wait(timeout=60)
    took = time.monotonic() - stopped
    assert code == 1
    assert took < 6 + 2 + 25, took  # the bound, a probe, the stop's grace
    assert "has not answered /health for" in server.logs()
    wait_gone(family)
