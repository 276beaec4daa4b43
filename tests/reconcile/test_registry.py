import asyncio
import time
from pathlib import Path

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.reconcile.registry import Registry, State, Traffic


def folder(version: str, *, problem: str | None = None, pending: bool = False) -> AdapterFolder:
    return AdapterFolder(name="a", path=Path("/loras/a"), fingerprint=version, rank=8,
                         problem=problem, pending=pending)


def test_ready_means_loaded_and_serving():
    registry = Registry()
    state = registry.track("a")
    state.loading(folder("v1"))
    assert registry.ready("a") is None  # a first load is not servable yet
    state.loaded(Path("/snap/a-1"), "v1")
    assert registry.ready("a") is not None
    state.loading(folder("v2"))  # reloading: the old version keeps answering
    assert registry.ready("a") is not None
    state.removing("folder removed")
    assert registry.ready("a") is None
    assert registry.counts()["removing"] == 1


def test_invalid_new_files_keep_the_served_version_and_are_reported_once():
    registry = Registry()
    state = registry.track("a")
    state.loading(folder("v1"))
    state.loaded(Path("/snap/a-1"), "v1")
    assert state.invalid(folder("v2", problem="broken JSON"), "broken JSON")
    assert not state.invalid(folder("v2", problem="broken JSON"), "broken JSON")
    record = registry.ready("a")
    assert record is not None and record.loaded_version == "v1" and record.version == "v2"
    assert record.reason == "broken JSON"


def test_a_refusal_sticks_to_its_files_and_a_load_forgets_it():
    registry = Registry()
    state = registry.track("a")
    state.loading(folder("v1"))
    state.refused_by_backend(folder("v1"), "refused by the backend: bad rank")
    record = registry.get("a")
    assert record is not None and record.state is State.FAILED and state.refused == "v1"
    assert registry.ready("a") is None
    state.loading(folder("v2"))
    state.loaded(Path("/snap/a-2"), "v2")
    assert state.refused == "" and state.attempts == 0


def test_backoff_doubles_and_is_capped():
    state = Registry().track("a")
    delays = [state.retry_later(100.0) for _ in range(10)]
    assert delays[:3] == [0.5, 1.0, 2.0] and max(delays) == 30.0
    assert state.backing_off(100.0 + 29.0) and not state.backing_off(100.0 + 30.5)


def test_since_moves_only_when_the_state_changes():
    registry = Registry()
    state = registry.track("a")
    state.invalid(folder("v1", pending=True), "being copied")
    first = state.record.since
    time.sleep(0.01)
    state.invalid(folder("v1", pending=True), "still being copied")
    assert state.record.since == first
    state.loading(folder("v1"))
    assert state.record.since > first


def test_dropping_a_name_forgets_everything_about_it():
    registry = Registry()
    state = registry.track("a")
    state.retry_later(0.0)
    registry.drop("a")
    assert registry.get("a") is None and not registry.track("a").backing_off(0.0)


def test_swap_waits_for_running_requests_and_holds_new_ones():
    traffic = Traffic()
    events: list[str] = []

    async def request(label: str, seconds: float) -> None:
        await traffic.enter("a")
        events.append(f"start {label}")
        await asyncio.sleep(seconds)
        events.append(f"end {label}")
        traffic.leave("a")

    async def swap() -> None:
        async with traffic.exclusive("a", timeout=5) as still_running:
            assert still_running == 0
            events.append("swap")

    async def scenario() -> None:
        first = asyncio.create_task(request("old", 0.2))
        await asyncio.sleep(0.05)
        swapping = asyncio.create_task(swap())
        await asyncio.sleep(0.01)
        later = asyncio.create_task(request("new", 0))
        await asyncio.gather(first, swapping, later)

    asyncio.run(scenario())
    assert events == ["start old", "end old", "swap", "start new", "end new"]


def test_swap_gives_up_waiting_after_the_timeout():
    traffic = Traffic()

    async def scenario() -> int:
        await traffic.enter("a")  # a request that never ends
        async with traffic.exclusive("a", timeout=0.1) as still_running:
            return still_running

    assert asyncio.run(scenario()) == 1
