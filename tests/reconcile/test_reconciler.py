"""The reconciler against a scripted backend: idempotent passes, failures kept, retries bounded."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from entrypoint.adapters.rank import RankLimit
from entrypoint.backends.base import Outcome, Reply
from entrypoint.backoff import Backoff
from entrypoint.reconcile import calls as reconciler_module
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import Registry, State
from tests.conftest import copy_adapter
from tests.fakes.scripted import ScriptedBackend


@pytest.fixture
def setup(tmp_path, library):
    source = tmp_path / "loras"
    source.mkdir()
    backend = ScriptedBackend()
    registry = Registry()
    reconciler = Reconciler(backend=backend, client=httpx.AsyncClient(), registry=registry,
                            source=source, served_name="tiny", rank_limit=RankLimit(16))
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


def test_a_retry_the_backend_no_longer_needs_settles_the_record(setup, library):
    """The backend lost what we serve, the load that gives it back fails, and then the backend
    holds it anyway (a load that timed out landing late; a list read before a swap landed). The
    retry finds nothing to load and clears "will be retried"; before, that reason stayed for
    ever, as nothing was left to do (the chaos run on vLLM waited 90 s for it)."""
    source, backend, registry, reconciler = setup

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        served = backend.served.pop("alpha")  # lost (unloaded behind our back)
        backend.down = True
        await settle(reconciler)
        assert "will be retried" in registry.get("alpha").reason
        backend.down = False
        backend.served["alpha"] = served  # the timed-out load lands after all
        calls = len(backend.calls)
        await asyncio.sleep(0.6)  # the backoff
        await settle(reconciler)
        record = registry.get("alpha")
        assert record.state is State.READY and record.reason == "", record
        assert len(backend.calls) == calls  # nothing loaded again: it was there
        await settle(reconciler)
        assert len(backend.calls) == calls and registry.get("alpha").reason == ""

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

    async def slow_load(client, name, path):
        await gate.wait()
        return await plain_load(client, name, path)

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


# ---- one operation owns the gate; paths outlive requests; trouble outside the folder ----

def with_snapshots(tmp_path, reconciler, *, grace: float = 0.3):
    from entrypoint.snapshots import SnapshotStore

    reconciler.snapshots = SnapshotStore(tmp_path / "cache" / "snapshots" / "x", grace=grace)
    return reconciler.snapshots


def test_a_swap_waits_for_running_requests_even_when_the_list_fails(setup, library, tmp_path):
    """The backend's list cannot be read and the load answers "already loaded": the unload
    and fresh load that follow must still wait for the adapter's running requests."""
    source, backend, registry, reconciler = setup
    events: list[str] = []
    plain_load, plain_unload = backend.load, backend.unload

    async def load(client, name, path):
        reply = await plain_load(client, name, path)
        events.append(f"load {reply.outcome.value}")
        return reply

    async def unload(client, name):
        events.append("unload")
        return await plain_unload(client, name)

    async def list_fails(client):
        raise httpx.ConnectError("listing failed")

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        backend.load, backend.unload, backend.loaded = load, unload, list_fails
        await reconciler.traffic.enter("alpha")  # a request is running on alpha
        (source / "alpha" / "adapter_model.safetensors").write_bytes(
            (library / "beta" / "adapter_model.safetensors").read_bytes())
        await reconciler.sync()
        await asyncio.sleep(0.3)
        assert "unload" not in events and "load done" not in events  # held at the gate
        events.append("request ended")
        reconciler.traffic.leave("alpha")
        await reconciler.wait_idle()
        assert events[-2:] == ["unload", "load done"]
        assert events.index("request ended") < events.index("unload")
        assert registry.get("alpha").state is State.READY
        assert backend.served["alpha"] == str(registry.get("alpha").loaded_path)

    asyncio.run(scenario())


def test_a_swap_that_times_out_keeps_the_gate_shut_until_it_lands(setup, library, tmp_path,
                                                                   monkeypatch):
    """The backend acts on a swap's load after our call timed out (seen on vLLM): requests
    that came meanwhile must not run while the name changes under them."""
    source, backend, registry, reconciler = setup
    with_snapshots(tmp_path, reconciler)
    monkeypatch.setattr(reconciler_module, "LATE_SWAP_POLL_SECS", 0.02)
    events: list[str] = []
    plain_load = backend.load

    async def late_load(client, name, path):
        if name not in registry.ready_names():
            return await plain_load(client, name, path)

        def land() -> None:
            events.append("swapped")
            backend.served[name] = str(path)

        asyncio.get_running_loop().call_later(0.3, land)
        return Reply(Outcome.TRANSIENT, "ReadTimeout", unanswered=True)

    async def request() -> None:
        await reconciler.traffic.enter("alpha")
        events.append("request")
        reconciler.traffic.leave("alpha")

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        backend.load = late_load
        (source / "alpha" / "adapter_model.safetensors").write_bytes(
            (library / "beta" / "adapter_model.safetensors").read_bytes())
        await reconciler.sync()
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(request())  # arrives while the swap is unanswered
        await reconciler.wait_idle()
        await waiting
        assert events == ["swapped", "request"]
        record = registry.get("alpha")
        assert record.state is State.READY and record.loaded_version == record.version
        assert backend.served["alpha"] == str(record.loaded_path)

    asyncio.run(scenario())


def test_new_weights_the_backend_refuses_leave_the_previous_version_served(setup, library,
                                                                          tmp_path):
    """A swap unloads, then loads the new version fresh; when the backend refuses it, the
    version served before is loaded back before any request passes the gate."""
    source, backend, registry, reconciler = setup
    with_snapshots(tmp_path, reconciler)
    plain_load = backend.load
    loads: list[str] = []

    async def refuse_new(client, name, path):
        loads.append(str(path))
        if len(loads) == 1:  # the new version
            return Reply(Outcome.REFUSED, "size mismatch for lora_B")
        return await plain_load(client, name, path)

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        first = registry.get("alpha").loaded_path
        backend.load = refuse_new
        (source / "alpha" / "adapter_model.safetensors").write_bytes(
            (library / "beta" / "adapter_model.safetensors").read_bytes())
        await settle(reconciler)
        record = registry.get("alpha")
        assert backend.served["alpha"] == str(first) == loads[-1] != loads[0]
        assert record.servable and record.loaded_path == first
        assert "size mismatch" in record.reason and "previous version" in record.reason
        await settle(reconciler)
        assert len(loads) == 2  # refused: not tried again until the files change

    asyncio.run(scenario())


def test_a_previous_version_that_cannot_be_loaded_back_is_restored_by_a_pass_of_its_own(
        setup, library, tmp_path, monkeypatch):
    """The new version is refused and loading the previous one back fails too: the backend
    holds nothing under the name. No event will come, so the reconciler asks for a pass itself,
    which loads the previous version again."""
    source, backend, registry, reconciler = setup
    reconciler.calls.backoff = Backoff(0.05, 1.0)
    with_snapshots(tmp_path, reconciler, grace=60)  # (no deletion due to wake it meanwhile)
    plain_load = backend.load
    loads: list[str] = []
    passes: list[asyncio.Task[None]] = []
    reconciler._wake = lambda: passes.append(asyncio.ensure_future(settle(reconciler)))

    async def refuse_twice(client, name, path):
        loads.append(str(path))
        if len(loads) == 1:
            return Reply(Outcome.REFUSED, "size mismatch for lora_B")
        if len(loads) == 2:
            return Reply(Outcome.TRANSIENT, "ConnectError")
        return await plain_load(client, name, path)

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        first = registry.get("alpha").loaded_path
        backend.load = refuse_twice
        (source / "alpha" / "adapter_model.safetensors").write_bytes(
            (library / "beta" / "adapter_model.safetensors").read_bytes())
        await settle(reconciler)
        assert "alpha" not in backend.served and len(loads) == 2
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "alpha" in backend.served:
                break
        await asyncio.gather(*passes)
        assert backend.served["alpha"] == str(first) == loads[-1]
        assert registry.get("alpha").servable and registry.get("alpha").loaded_path == first

    asyncio.run(scenario())


def test_removal_drains_unloads_then_deletes_the_snapshot_after_its_grace(setup, library,
                                                                          tmp_path):
    source, backend, registry, reconciler = setup
    store = with_snapshots(tmp_path, reconciler, grace=0.3)
    events: list[str] = []
    plain_unload = backend.unload

    async def unload(client, name):
        events.append("unload")
        return await plain_unload(client, name)

    backend.unload = unload

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        snapshot = Path(backend.served["alpha"])
        await reconciler.traffic.enter("alpha")
        shutil.rmtree(source / "alpha")
        await reconciler.sync()
        await asyncio.sleep(0.2)
        assert registry.get("alpha").state is State.REMOVING  # closed: new requests get 404
        assert registry.ready("alpha") is None and events == []  # not unloaded under it
        events.append("request ended")
        reconciler.traffic.leave("alpha")
        await reconciler.wait_idle()
        assert events == ["request ended", "unload"] and registry.get("alpha") is None
        assert snapshot.is_dir()  # the backend may still read it for a while
        await asyncio.sleep(0.4)
        await settle(reconciler)
        assert not snapshot.exists() and store.next_deletion() is None

    asyncio.run(scenario())


def test_a_retired_snapshot_is_kept_while_its_adapter_still_has_requests(setup, library,
                                                                         tmp_path):
    source, backend, registry, reconciler = setup
    with_snapshots(tmp_path, reconciler, grace=0.2)

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        first = Path(backend.served["alpha"])
        reconciler_drain = reconciler_module.DRAIN_SECS
        reconciler_module.DRAIN_SECS = 0.1  # a request that outlives the drain
        try:
            await reconciler.traffic.enter("alpha")
            (source / "alpha" / "adapter_model.safetensors").write_bytes(
                (library / "beta" / "adapter_model.safetensors").read_bytes())
            await settle(reconciler)
            assert Path(backend.served["alpha"]) != first
            await asyncio.sleep(0.4)
            await settle(reconciler)
            assert first.is_dir()  # the old weights' request is still running
            reconciler.traffic.leave("alpha")
            await asyncio.sleep(0.4)
            await settle(reconciler)
            assert not first.exists()
        finally:
            reconciler_module.DRAIN_SECS = reconciler_drain

    asyncio.run(scenario())


def test_a_vanished_source_keeps_everything_served_and_says_so(setup, library, tmp_path, caplog):
    source, backend, registry, reconciler = setup

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        source.rename(tmp_path / "unmounted")
        for _ in range(3):
            await settle(reconciler)
        assert "alpha" in backend.served and registry.ready("alpha") is not None
        assert "NIM_PEFT_SOURCE is unavailable" in registry.get("alpha").reason
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "NIM_PEFT_SOURCE=" in errors[0].getMessage()
        (tmp_path / "unmounted").rename(source)
        copy_adapter(library / "beta", source / "beta")
        await settle(reconciler)
        assert set(backend.served) == {"alpha", "beta"}
        assert registry.get("alpha").reason == ""

    asyncio.run(scenario())


def test_an_unwritable_cache_is_reported_once_and_what_is_served_stays(setup, library, tmp_path,
                                                                       caplog):
    source, backend, registry, reconciler = setup
    store = with_snapshots(tmp_path, reconciler)

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        served = backend.served["alpha"]
        shutil.rmtree(store.root.parent)
        store.root.parent.write_text("a file where the snapshot folder should be")
        copy_adapter(library / "beta", source / "beta")
        (source / "alpha" / "adapter_model.safetensors").write_bytes(
            (library / "gamma" / "adapter_model.safetensors").read_bytes())
        for _ in range(4):
            await settle(reconciler)
            await asyncio.sleep(0.3)
        assert backend.served == {"alpha": served}  # alpha keeps its version, beta waits
        beta, alpha = registry.get("beta"), registry.get("alpha")
        assert beta.state is State.PENDING and "NIM_CACHE_PATH" in beta.reason
        assert alpha.state is State.READY and "NIM_CACHE_PATH" in alpha.reason
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "NIM_CACHE_PATH" in errors[0].getMessage()
        store.root.parent.unlink()  # fixed
        await asyncio.sleep(2.1)  # past the backoff
        await settle(reconciler)
        assert set(backend.served) == {"alpha", "beta"} and backend.served["alpha"] != served

    asyncio.run(scenario())


def test_a_full_cache_disk_is_reported_and_recovers(setup, library, tmp_path):
    source, backend, registry, reconciler = setup
    store = with_snapshots(tmp_path, reconciler)
    mount = store.root.parent.parent
    mount.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root): full-disk case not run")
    try:
        filler = mount / "filler"

        async def scenario():
            with filler.open("wb") as handle:  # leave almost nothing free
                with contextlib.suppress(OSError):
                    handle.write(b"\0" * (1 << 20))
            copy_adapter(library / "alpha", source / "alpha")
            await settle(reconciler)
            record = registry.get("alpha")
            assert record.state is State.PENDING
            assert "No space left on device" in record.reason and "NIM_CACHE_PATH" in record.reason
            filler.unlink()
            await asyncio.sleep(0.6)
            await settle(reconciler)
            assert registry.get("alpha").state is State.READY

        asyncio.run(scenario())
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_folder_moved_out_and_back_mid_removal_is_served_again(setup, library, tmp_path):
    """Its unload failed (the backend was down), so the removal was still pending when the very
    same files came back (`mv` keeps them as they were): served again, not stuck `removing`."""
    source, backend, registry, reconciler = setup

    async def failing_unload(client, name) -> Reply:
        backend.calls.append(("unload", name))
        return Reply(Outcome.TRANSIENT, "ConnectError")

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        assert registry.get("alpha").state is State.READY
        real_unload = backend.unload
        backend.unload = failing_unload
        (source / "alpha").rename(tmp_path / "alpha-away")
        await settle(reconciler)
        assert registry.get("alpha").state is State.REMOVING  # its unload is to be retried
        (tmp_path / "alpha-away").rename(source / "alpha")
        backend.unload = real_unload
        await asyncio.sleep(0.6)  # past the unload's backoff
        for _ in range(3):
            await settle(reconciler)
        record = registry.get("alpha")
        assert record.state is State.READY and record.servable, record
        assert "alpha" in backend.served

    asyncio.run(scenario())


def test_an_unload_that_times_out_and_lands_later_is_done_not_retried(setup, library):
    """The unload's answer never came but the backend carried it out a little later: the removal
    is done (one unload call), and the folder coming back is loaded afresh; before, the late
    unload could remove the version loaded again meanwhile (seen in the chaos run on vLLM)."""
    source, backend, registry, reconciler = setup

    async def scenario():
        copy_adapter(library / "alpha", source / "alpha")
        await settle(reconciler)
        backend.late_unload = 0.5
        shutil.rmtree(source / "alpha")
        await reconciler.sync()
        await asyncio.sleep(0.1)
        copy_adapter(library / "alpha", source / "alpha")  # back while the unload is in flight
        await settle(reconciler)
        assert registry.get("alpha") is None  # the removal ended when the unload landed
        assert backend.calls.count(("unload", "alpha")) == 1
        backend.late_unload = None
        await settle(reconciler)
        assert registry.get("alpha").state is State.READY and "alpha" in backend.served

    asyncio.run(scenario())
