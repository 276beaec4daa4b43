"""Readiness tells the truth: it follows the backend's health and the adapter loop's life."""

from __future__ import annotations

import asyncio

from entrypoint.config.settings import load_settings
from entrypoint.runtime.service import ADAPTER_LOOP, Service
from entrypoint.runtime.startup import resolve
from entrypoint.runtime.tasks import ServiceTasks
from tests.conftest import copy_adapter


def test_readiness_follows_backend_health_and_the_adapter_loop(monkeypatch, tiny_model,
                                                                library, tmp_path):
    source = tmp_path / "loras"
    source.mkdir()
    copy_adapter(library / "alpha", source / "alpha")
    monkeypatch.setenv("NIM_MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(source))
    monkeypatch.setenv("NIM_PEFT_REFRESH_INTERVAL", "5")
    startup = resolve(load_settings(), backend_port=1, dry_run=True)

    async def scenario() -> list[str | None]:
        service = Service(startup)
        seen = [service.not_ready_because()]
        service.tasks = tasks = ServiceTasks(restart_base=0.3)
        service.gateway.backend_up = service.backend_healthy = True
        service.adapters_synced = True
        failures: list[int] = []

        async def adapter_loop() -> None:
            failures.append(1)
            if len(failures) == 1:
                raise RuntimeError("the scan blew up")
            await asyncio.Event().wait()

        tasks.loop(ADAPTER_LOOP, adapter_loop)
        await asyncio.sleep(0.05)
        seen.append(service.not_ready_because())  # the loop died: not ready
        await asyncio.sleep(0.4)
        seen.append(service.not_ready_because())  # restarted: ready
        service.backend_healthy = False
        seen.append(service.not_ready_because())  # the backend stopped answering
        tasks.stop(0)
        seen.append(service.not_ready_because())
        await tasks.cancel()
        await service.client.aclose()
        return seen

    assert asyncio.run(scenario()) == [
        "starting",
        "the adapter loop failed and is being restarted",
        None,
        "vllm does not answer its health check",
        "stopping",
    ]


def test_the_runtime_api_is_on_in_dynamic_mode_unless_turned_off(monkeypatch, tiny_model,
                                                                  tmp_path):
    source = tmp_path / "loras"
    source.mkdir()
    monkeypatch.setenv("NIM_MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(source))
    monkeypatch.setenv("NIM_CACHE_PATH", str(tmp_path / "cache"))

    def off_reason(**env: str) -> str | None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)

        async def build() -> str | None:
            service = Service(resolve(load_settings(), backend_port=1, dry_run=True))
            await service.client.aclose()
            api = service.gateway.api
            assert api is not None
            return None if api.refusal() is None else api.refusal().message

        return asyncio.run(build())

    assert "static mode" in off_reason()
    assert off_reason(NIM_PEFT_REFRESH_INTERVAL="5") is None
    assert "NIM_PEFT_API_ENABLED=false" in off_reason(NIM_PEFT_API_ENABLED="false")


class FakeBackend:
    """Stands in for `BackendProcess`: records what the service asks of it."""

    pid = None
    tail: tuple[str, ...] = ()

    def __init__(self, events: list[str], port: int, *, fail_start: bool = False) -> None:
        self.events, self.port, self.fail_start = events, port, fail_start
        self.exited: asyncio.Event | None = None

    async def start(self) -> None:
        self.exited = asyncio.Event()
        if self.fail_start:
            raise OSError("no such engine")
        self.events.append("backend started")

    async def wait_ready(self, client, path) -> bool:
        return True

    async def wait(self) -> int:
        assert self.exited is not None
        await self.exited.wait()
        return 0

    async def stop(self) -> int:
        self.events.append("backend stopped")
        if port_accepts(self.port):
            self.events.append("public port still open")
        if self.exited is not None:
            self.exited.set()
        return 0


def port_accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def record(monkeypatch, client, method: str, events: list[str], event: str) -> None:
    close = getattr(client, method)

    async def closing() -> None:
        events.append(event)
        await close()

    monkeypatch.setattr(client, method, closing)


def run_with_fake_backend(monkeypatch, tiny_model, *, fail_start: bool) -> tuple[list, object]:
    from tests.e2e.server import free_port

    port = free_port()
    monkeypatch.setenv("NIM_MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("NIM_SERVER_PORT", str(port))
    events: list[str] = []
    # (the test process must not become a subreaper nor reap pytest's children)
    monkeypatch.setattr("entrypoint.runtime.service.become_subreaper", lambda: True)
    monkeypatch.setattr("entrypoint.runtime.service.reap_orphans",
                        lambda keep: events.append("orphans reaped") or [])
    startup = resolve(load_settings(), backend_port=1, dry_run=True)

    async def scenario() -> object:
        service = Service(startup, host="127.0.0.1")
        service.process = FakeBackend(events, port, fail_start=fail_start)
        service.on_ready = lambda: service.tasks.stop(0)
        record(monkeypatch, service.client, "aclose", events, "admin client closed")
        record(monkeypatch, service.proxy_client, "close", events, "proxy client closed")
        try:
            return await service.run()
        except OSError as exc:
            return exc
        finally:
            events.append("port closed" if not port_accepts(port) else "port left open")

    return events, asyncio.run(scenario())


def test_the_stop_is_the_start_in_reverse(monkeypatch, tiny_model):
    events, code = run_with_fake_backend(monkeypatch, tiny_model, fail_start=False)
    assert code == 0
    # the backend stops while the public port still finishes its answers; then the port,
    # the clients
    assert events == ["backend started", "backend stopped", "public port still open",
                      "orphans reaped", "admin client closed", "proxy client closed",
                      "port closed"]


def test_a_start_that_fails_half_way_undoes_what_it_did(monkeypatch, tiny_model):
    events, error = run_with_fake_backend(monkeypatch, tiny_model, fail_start=True)
    assert isinstance(error, OSError)
    assert events == ["backend stopped", "public port still open", "orphans reaped",
                      "admin client closed", "proxy client closed", "port closed"]
