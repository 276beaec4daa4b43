import asyncio

from entrypoint.registry import AdapterRecord, Registry, State, Traffic


def test_ready_means_loaded_and_serving():
    registry = Registry()
    registry.put(AdapterRecord(name="a", state=State.LOADING))
    assert registry.ready("a") is None  # a first load is not servable yet
    registry.update("a", state=State.READY, loaded_path="/snap/a-1")
    assert registry.ready("a") is not None
    registry.update("a", state=State.LOADING)  # reloading: the old version keeps answering
    assert registry.ready("a") is not None
    registry.update("a", state=State.REMOVING)
    assert registry.ready("a") is None
    assert registry.counts()["removing"] == 1


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
