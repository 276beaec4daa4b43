"""The service's task structure: nothing dies silently; loops restart; vital tasks stop it."""

from __future__ import annotations

import asyncio
import logging

from entrypoint.runtime import tasks as tasks_module
from entrypoint.runtime.tasks import ServiceTasks


def test_a_failing_loop_is_logged_restarted_and_not_alive_meanwhile(caplog):
    runs: list[int] = []

    async def scenario():
        tasks = ServiceTasks(restart_base=0.2)

        async def adapter_loop():
            runs.append(1)
            if len(runs) == 1:
                raise RecursionError("a folder the scan choked on")
            await asyncio.Event().wait()

        tasks.loop("adapter loop", adapter_loop)
        await asyncio.sleep(0.05)
        assert not tasks.alive("adapter loop")  # waiting to be restarted: readiness says no
        await asyncio.sleep(0.3)
        assert tasks.alive("adapter loop") and len(runs) == 2
        assert not tasks.stopping
        await tasks.cancel()

    asyncio.run(scenario())
    failure = next(r for r in caplog.records if r.levelno == logging.ERROR)
    assert "adapter loop failed; restarting it" in failure.getMessage()
    assert failure.exc_info and "RecursionError" in caplog.text  # with its traceback


def test_a_loop_that_keeps_failing_stops_the_service(monkeypatch):
    monkeypatch.setattr(tasks_module, "MAX_FAILURES", 3)

    async def scenario():
        tasks = ServiceTasks(restart_base=0.01)

        async def broken():
            raise ValueError("always")

        tasks.loop("health", broken)
        code = await asyncio.wait_for(tasks.wait(), timeout=5)
        assert code == 1 and "health keeps failing" in tasks.reason
        await tasks.cancel()

    asyncio.run(scenario())


def test_a_loop_that_returns_is_restarted_too(caplog):
    async def scenario():
        tasks = ServiceTasks(restart_base=0.01)
        runs: list[int] = []

        async def returns():
            runs.append(1)
            if len(runs) > 2:
                await asyncio.Event().wait()

        tasks.loop("reaper", returns)
        await asyncio.sleep(0.2)
        assert len(runs) == 3 and tasks.alive("reaper")
        await tasks.cancel()

    asyncio.run(scenario())
    assert "should run until the service stops" in caplog.text


def test_a_vital_task_that_fails_or_ends_stops_the_service_non_zero(caplog):
    async def scenario(work) -> tuple[int, str]:
        tasks = ServiceTasks()
        tasks.vital("public port", work())
        code = await asyncio.wait_for(tasks.wait(), timeout=5)
        await tasks.cancel()
        return code, tasks.reason

    async def fails():
        raise OSError("socket gone")

    async def ends():
        return None

    assert asyncio.run(scenario(fails)) == (1, "public port failed: OSError('socket gone')")
    assert asyncio.run(scenario(ends)) == (1, "public port ended unexpectedly")
    assert "public port failed; stopping the service" in caplog.text


def test_the_first_stop_decides_the_exit_code():
    async def scenario():
        tasks = ServiceTasks()
        tasks.stop(0)
        tasks.stop(1, "later")
        return await tasks.wait()

    assert asyncio.run(scenario()) == 0
