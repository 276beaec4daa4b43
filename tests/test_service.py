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
