"""The reconciler against a scripted backend: idempotent passes, failures kept, retries bounded."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import pytest

from entrypoint.backends.base import Outcome, Reply
from entrypoint.backends.vllm import VLLMBackend
from entrypoint.reconcile import Reconciler
from entrypoint.registry import Registry, State
from tests.conftest import copy_adapter


class ScriptedBackend(VLLMBackend):
    """vLLM's interface with the HTTP calls replaced by a dict and a script of replies."""

    def __init__(self) -> None:
        self.served: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()
        self.down = False

    async def load(self, client, name, path, *, replace=False) -> Reply:
        self.calls.append(("load", name))
        if self.down:
            return Reply(Outcome.TRANSIENT, "ConnectError")
        if name in self.refuse:
            return Reply(Outcome.REFUSED, "bad tensors")
        if name in self.served and not replace:
            return Reply(Outcome.ALREADY_LOADED, "already loaded")
        self.served[name] = str(path)
        return Reply(Outcome.DONE)

    async def unload(self, client, name) -> Reply:
        self.calls.append(("unload", name))
        return Reply(Outcome.DONE) if self.served.pop(name, None) else Reply(Outcome.GONE)

    async def loaded(self, client) -> dict[str, str]:
        return dict(self.served)


@pytest.fixture
def setup(tmp_path, library):
    source = tmp_path / "loras"
    source.mkdir()
    backend = ScriptedBackend()
    registry = Registry()
    reconciler = Reconciler(backend=backend, client=httpx.AsyncClient(), registry=registry,
                            source=source, served_name="tiny", max_rank=16)
    return source, backend, registry, reconciler


async def settle(reconciler: Reconciler) -> None:
    await reconciler.sync()
    await reconciler.wait_idle()


def test_load_unload_and_idempotence(setup, library):
    source, backend, registry, reconciler = setup

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        copy_adapter(library / "beta", source / "beta")
        await settle(reconciler)
        assert set(backend.served) == {"alpha", "beta"}
        assert registry.ready_names() == ["alpha", "beta"]
        calls = len(backend.calls)
        await settle(reconciler)
        await settle(reconciler)
        assert len(backend.calls) == calls  # nothing changed, nothing done
        shutil.rmtree(source / "beta")
        await settle(reconciler)
        assert set(backend.served) == {"alpha"} and registry.get("beta") is None

    asyncio.run(scenario())


def test_refused_adapter_is_failed_until_its_files_change(setup, library):
    source, backend, registry, reconciler = setup

    async def scenario():
        backend.refuse.add("alpha")
        copy_adapter(library / "alpha", source / "alpha")
        for _ in range(5):
            await settle(reconciler)
        assert backend.calls == [("load", "alpha")]  # no retry storm
        assert registry.get("alpha").state is State.FAILED
        assert "bad tensors" in registry.get("alpha").reason
        backend.refuse.clear()
        (source / "alpha" / "README.md").write_text("retrained")
        await settle(reconciler)
        assert registry.get("alpha").state is State.READY

    asyncio.run(scenario())


def test_transient_errors_back_off_and_recover(setup, library):
    source, backend, registry, reconciler = setup

    async def scenario():
        backend.down = True
        copy_adapter(library / "alpha", source / "alpha")
        for _ in range(10):
            await settle(reconciler)
        assert len(backend.calls) == 1  # the next try waits for its backoff
        assert registry.get("alpha").state is State.PENDING
        backend.down = False
        await asyncio.sleep(0.6)
        await settle(reconciler)
        assert registry.get("alpha").state is State.READY

    asyncio.run(scenario())


def test_lost_in_backend_is_loaded_again(setup, library):
    source, backend, registry, reconciler = setup

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        backend.served.clear()  # e.g. unloaded through the backend's own API
        await settle(reconciler)
        assert "alpha" in backend.served

    asyncio.run(scenario())


def test_pending_folder_waits_without_failing(setup, library):
    source, backend, registry, reconciler = setup

    async def scenario():
        folder = Path(source / "alpha")
        folder.mkdir()
        (folder / "adapter_config.json").write_text(
            (library / "alpha" / "adapter_config.json").read_text())
        await settle(reconciler)
        assert registry.get("alpha").state is State.PENDING and not backend.calls
        shutil.copy(library / "alpha" / "adapter_model.safetensors", folder)
        await settle(reconciler)
        assert registry.get("alpha").state is State.READY

    asyncio.run(scenario())


def test_change_during_a_load_is_looked_at_when_the_load_ends(setup, library):
    source, backend, registry, reconciler = setup
    wakes: list[int] = []
    reconciler._wake = lambda: wakes.append(1)
    gate = asyncio.Event()
    plain_load = backend.load

    async def slow_load(client, name, path, *, replace=False):
        await gate.wait()
        return await plain_load(client, name, path, replace=replace)

    backend.load = slow_load

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await reconciler.sync()  # starts the load, which hangs
        shutil.rmtree(source / "alpha")
        await reconciler.sync()  # sees the removal while the load is in flight
        assert wakes == []
        gate.set()
        await reconciler.wait_idle()
        assert wakes == [1]  # asks for a new pass at once, not at the next interval
        await settle(reconciler)
        assert "alpha" not in backend.served and registry.get("alpha") is None

    asyncio.run(scenario())
