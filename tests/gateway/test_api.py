"""The runtime adapter API over the reconciler and a scripted backend: confinement, the same
validation as folders, the watcher and the API not fighting, intent kept across a restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from entrypoint.adapters.folder import Origin, inspect_folder
from entrypoint.adapters.rank import RankLimit
from entrypoint.gateway.api import AdapterAPI
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import Registry, State
from entrypoint.snapshots import SnapshotRefused, SnapshotStore
from entrypoint.sources.intent import Intent
from tests.conftest import copy_adapter, edit_config
from tests.fakes.scripted import ScriptedBackend


class World:
    """A source folder, an allowed folder, a folder outside both, and a service's parts."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.source = tmp / "loras"
        self.allowed = tmp / "allowed"
        self.outside = tmp / "outside"
        for folder in (self.source, self.allowed, self.outside):
            folder.mkdir()
        self.file = tmp / "cache" / "adapter-api" / "port-8000.json"
        self.backend = ScriptedBackend()
        self.start()

    def start(self) -> None:
        """A (re)started entrypoint: fresh registry, the intent read back from its file."""
        self.registry = Registry()
        self.reconciler = Reconciler(
            backend=self.backend, client=httpx.AsyncClient(), registry=self.registry,
            source=self.source, served_name="tiny", rank_limit=RankLimit(16),
            intent=Intent.read(self.file), api_roots=(self.source, self.allowed))
        self.api = AdapterAPI(registry=self.registry, served_name="tiny", source=self.source,
                              reconciler=self.reconciler, timeout=10)

    async def settle(self, passes: int = 1) -> None:
        for _ in range(passes):
            await self.reconciler.sync()
            await self.reconciler.wait_idle()

    def kept(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.exists() else {}


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def test_paths_outside_the_allowed_folders_get_a_403_naming_them(world, library):
    copy_adapter(library / "alpha", world.outside / "alpha")
    (world.source / "link-out").symlink_to(world.outside / "alpha")
    inside = world.allowed / "sneaky"
    copy_adapter(library / "alpha", inside)
    (inside / "adapter_model.safetensors").unlink()
    (inside / "adapter_model.safetensors").symlink_to(
        world.outside / "alpha" / "adapter_model.safetensors")

    async def scenario():
        for path in (str(world.outside / "alpha"),  # absolute, outside
                     f"{world.source}/../outside/alpha",  # `..` out of the source
                     str(world.source / "link-out"),  # a link in the source leading out
                     str(inside)):  # a folder inside whose weights are a link out
            answer = await world.api.load("evil", path)
            assert answer.status == 403, (path, answer)
            assert str(world.source) in answer.message and str(world.allowed) in answer.message
            assert "NIM_PEFT_API_ALLOWED_PATHS" in answer.message
        answer = await world.api.load("evil", "alpha")
        assert answer.status == 400 and "absolute path" in answer.message
        assert world.backend.calls == [] and world.registry.get("evil") is None
        assert world.kept() == {}

    asyncio.run(scenario())


def test_an_api_adapter_is_served_validated_and_never_unloaded_by_a_scan(world, library):
    copy_adapter(library / "alpha", world.allowed / "sql-v1")
    copy_adapter(library / "beta", world.source / "beta")

    async def scenario():
        await world.settle()
        answer = await world.api.load("sql", str(world.allowed / "sql-v1"))
        assert answer.ok and answer.message == "Success: LoRA adapter 'sql' added successfully."
        record = world.registry.get("sql")
        assert record.origin is Origin.API and record.servable
        assert record.source == world.allowed / "sql-v1"
        assert world.kept()["loaded"] == {"sql": str(world.allowed / "sql-v1")}
        calls = list(world.backend.calls)
        await world.settle(passes=5)  # the folder has no "sql": no scan unloads it
        assert world.backend.calls == calls and "sql" in world.backend.served
        again = await world.api.load("sql", str(world.allowed / "sql-v1"))
        assert again.status == 400 and "already been loaded" in again.message
        # A second name for the same files is another adapter; the base model's name is not.
        assert (await world.api.load("tiny", str(world.allowed / "sql-v1"))).status == 400
        assert (await world.api.load("bad name", str(world.allowed / "sql-v1"))).status == 400

    asyncio.run(scenario())


def test_api_loads_get_the_folder_checks_and_failures_leave_nothing(world, library):
    copy_adapter(library / "alpha", world.allowed / "big")
    edit_config(world.allowed / "big", r=64)
    copy_adapter(library / "alpha", world.allowed / "half")
    (world.allowed / "half" / "adapter_model.safetensors").unlink()
    copy_adapter(library / "alpha", world.allowed / "fine")

    async def scenario():
        big = await world.api.load("big", str(world.allowed / "big"))
        assert big.status == 400 and "rank 64 is above" in big.message
        half = await world.api.load("half", str(world.allowed / "half"))
        assert half.status == 400 and "no adapter_model.safetensors" in half.message
        missing = await world.api.load("gone", str(world.allowed / "nothing-here"))
        assert missing.status == 404 and "does not exist" in missing.message  # as vLLM's
        world.backend.refuse.add("fine")
        refused = await world.api.load("fine", str(world.allowed / "fine"))
        assert refused.status == 400 and "bad tensors" in refused.message
        world.backend.refuse.clear()
        world.backend.down = True
        down = await world.api.load("fine", str(world.allowed / "fine"))
        assert down.status == 503 and "will be retried" in down.message
        world.backend.down = False
        await asyncio.sleep(0.6)
        await world.settle(passes=2)
        assert world.kept()["loaded"] == {}  # nothing failed is kept ...
        assert world.registry.records() == []  # ... or shown
        assert world.backend.served == {}

    asyncio.run(scenario())


def test_a_folder_adapter_unloaded_by_the_api_stays_unloaded_until_its_folder_changes(
        world, library):
    copy_adapter(library / "alpha", world.source / "alpha")

    async def scenario():
        await world.settle()
        answer = await world.api.unload("alpha")
        assert answer.ok and "removed successfully" in answer.message
        assert "alpha" not in world.backend.served
        await world.settle(passes=5)  # NIM's watcher would load it again here; this one not
        record = world.registry.get("alpha")
        assert record.state is State.UNLOADED and "alpha" not in world.backend.served
        assert "unloaded through the API" in record.reason
        assert world.kept()["unloaded"] == {"alpha": record.version}
        assert (await world.api.unload("alpha")).status == 404  # not loaded: vLLM's 404
        world.start()  # a restart remembers it
        await world.settle(passes=2)
        assert world.registry.get("alpha").state is State.UNLOADED
        assert "alpha" not in world.backend.served
        (world.source / "alpha" / "README.md").write_text("retrained")
        await world.settle()
        assert world.registry.get("alpha").state is State.READY
        assert world.kept()["unloaded"] == {}

    asyncio.run(scenario())


def test_loading_a_folder_adapter_from_its_own_folder_undoes_an_api_unload(world, library):
    copy_adapter(library / "alpha", world.source / "alpha")
    copy_adapter(library / "beta", world.allowed / "other")

    async def scenario():
        await world.settle()
        conflict = await world.api.load("alpha", str(world.allowed / "other"))
        assert conflict.status == 400 and "folder named 'alpha'" in conflict.message
        assert (await world.api.unload("alpha")).ok
        answer = await world.api.load("alpha", str(world.source / "alpha"))
        assert answer.ok and world.registry.get("alpha").state is State.READY
        assert world.registry.get("alpha").origin is Origin.FOLDER
        assert "alpha" in world.backend.served and world.kept()["unloaded"] == {}

    asyncio.run(scenario())


def test_api_adapters_survive_a_restart_and_unload_forgets_them(world, library):
    copy_adapter(library / "alpha", world.allowed / "a1")

    async def scenario():
        assert (await world.api.load("sql", str(world.allowed / "a1"))).ok
        world.backend.served.clear()  # the backend restarted with the entrypoint
        world.start()
        await world.settle()
        assert world.registry.get("sql").servable and "sql" in world.backend.served
        assert world.registry.get("sql").origin is Origin.API
        answer = await world.api.unload("sql")
        assert answer.ok and "sql" not in world.backend.served
        assert world.registry.get("sql") is None and world.kept()["loaded"] == {}
        assert (await world.api.unload("sql")).status == 404

    asyncio.run(scenario())


def test_load_inplace_swaps_an_api_adapter_to_a_new_folder(world, library):
    copy_adapter(library / "alpha", world.allowed / "v1")
    copy_adapter(library / "beta", world.allowed / "v2")

    async def scenario():
        assert (await world.api.load("sql", str(world.allowed / "v1"))).ok
        first = world.backend.served["sql"]
        answer = await world.api.load("sql", str(world.allowed / "v2"), replace=True)
        assert answer.ok and world.backend.served["sql"] != first
        assert world.registry.get("sql").source == world.allowed / "v2"
        assert world.kept()["loaded"] == {"sql": str(world.allowed / "v2")}

    asyncio.run(scenario())


def test_an_api_adapter_whose_folder_leaves_the_allowed_folders_keeps_its_served_version(
        world, library, tmp_path):
    copy_adapter(library / "alpha", world.allowed / "a1")

    async def scenario():
        assert (await world.api.load("sql", str(world.allowed / "a1"))).ok
        shutil.move(world.allowed / "a1", world.outside / "a1")
        os.symlink(world.outside / "a1", world.allowed / "a1")
        await world.settle()
        record = world.registry.get("sql")
        assert record.servable and "is not in the folders" in record.reason
        world.start()  # after a restart it is not loaded from there
        world.backend.served.clear()
        await world.settle()
        record = world.registry.get("sql")
        assert record.state is State.FAILED and "NIM_PEFT_API_ALLOWED_PATHS" in record.reason
        assert "sql" not in world.backend.served

    asyncio.run(scenario())


def test_an_unreadable_intent_file_is_set_aside_and_bad_entries_are_dropped_alone(
        world, library, caplog):
    world.file.parent.mkdir(parents=True)
    world.file.write_text("{not json")
    world.start()
    assert world.reconciler.intent.loaded == {}
    assert [p.name for p in world.file.parent.glob("*.bad-*")]
    copy_adapter(library / "alpha", world.allowed / "good")
    world.file.write_text(json.dumps({"version": 1, "loaded": {
        "good": str(world.allowed / "good"), "nul": str(world.allowed) + "/c\u0000",
        "rel": "store/x", "n\n": str(world.allowed / "good"), "num": 5},
        "unloaded": {"beta": 7, "alpha": "abc"}}))
    world.start()
    assert world.reconciler.intent.loaded == {"good": world.allowed / "good"}
    assert world.reconciler.intent.unloaded == {"alpha": "abc"}
    skipped = [r.message for r in caplog.records if "skipped the API" in r.message]
    assert len(skipped) == 5 and all("\n" not in line for line in skipped)


@pytest.mark.parametrize(("name", "path", "message"), [
    ("n1\n", "{allowed}/good", "is not a valid adapter name"),  # `$` would match before \n
    (".hidden", "{allowed}/good", "starts with '.'"),
    ("..", "{allowed}/good", "starts with '.'"),
    ("x" * 201, "{allowed}/good", "longer than 200 characters"),
    ("x" * 5000, "{allowed}/good", "longer than 200 characters"),
    ("nul", "{allowed}/good\0x", "control characters"),
    ("nl", "{allowed}/good\nx", "control characters"),
    ("long", "/" + "a" * 5000, "over 4096 characters"),
])
def test_hostile_names_and_paths_get_a_400_at_once(world, library, name, path, message):
    copy_adapter(library / "alpha", world.allowed / "good")
    answer = asyncio.run(world.api.load(name, path.format(allowed=world.allowed)))
    assert answer.status == 400 and message in answer.message, answer
    assert "\n" not in answer.message
    assert world.backend.calls == [] and world.kept() == {}


def test_a_file_swapped_for_a_link_out_after_the_check_is_never_copied(world, library,
                                                                       tmp_path):
    """The scan checks links; a link swapped in between that check and the copy is caught on
    the open file itself (a race a probe won 13 times in 27 tries before)."""
    snapshots = SnapshotStore(tmp_path / "snapshots")
    folder = world.allowed / "y"
    copy_adapter(library / "alpha", folder)
    copy_adapter(library / "gamma", world.outside / "evil")
    judged = inspect_folder(folder)
    weights = folder / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(world.outside / "evil" / "adapter_model.safetensors")
    os.utime(weights, follow_symlinks=False)
    with pytest.raises(SnapshotRefused, match="outside the folders"):
        snapshots.take(judged, roots=(world.allowed,))
    assert not list((tmp_path / "snapshots").glob("y-*"))


def test_folder_adapters_whose_files_link_out_of_the_source_are_refused(world, library):
    copy_adapter(library / "gamma", world.outside / "evil")
    folder = world.source / "w"
    folder.mkdir()
    shutil.copy(library / "alpha" / "adapter_config.json", folder)
    (folder / "adapter_model.safetensors").symlink_to(
        world.outside / "evil" / "adapter_model.safetensors")
    inside = world.source / "v"  # a link that stays inside the source is fine
    copy_adapter(library / "beta", world.source / ".blobs" / "v")
    inside.mkdir()
    for file in (world.source / ".blobs" / "v").iterdir():
        (inside / file.name).symlink_to(file)
    asyncio.run(world.settle())
    record = world.registry.get("w")
    assert record.state is State.FAILED and "outside NIM_PEFT_SOURCE" in record.reason
    assert "w" not in world.backend.served and "v" in world.backend.served


def test_unloading_an_api_adapter_keeps_a_same_named_folder_from_taking_its_place(
        world, library):
    copy_adapter(library / "gamma", world.allowed / "q")

    async def scenario():
        assert (await world.api.load("q", str(world.allowed / "q"))).ok
        copy_adapter(library / "beta", world.source / "q")  # a folder of that name appears
        await world.settle(passes=2)
        answer = await world.api.unload("q")
        assert answer.ok, answer
        await world.settle(passes=3)
        assert "q" not in world.backend.served
        assert world.registry.get("q").state is State.UNLOADED

    asyncio.run(scenario())


def test_an_api_load_above_a_derived_rank_limit_says_how_to_raise_it(world, library):
    world.reconciler.scanner.limit = RankLimit(16, derived=True, engine="vllm", engine_max=512,
                                               allowed=(8, 16, 32, 64, 128))
    copy_adapter(library / "big", world.allowed / "big")
    answer = asyncio.run(world.api.load("big", str(world.allowed / "big")))
    assert answer.status == 400 and "set NIM_MAX_LORA_RANK=64 and restart" in answer.message


def test_a_decision_that_cannot_be_kept_is_not_taken(world, library, tmp_path):
    """When the intent file cannot be written, the call is a 500 naming it and nothing changes
    (a restart would otherwise undo what the call answered)."""
    copy_adapter(library / "alpha", world.allowed / "a1")
    copy_adapter(library / "beta", world.source / "beta")

    async def scenario():
        await world.settle()
        assert (await world.api.load("kept", str(world.allowed / "a1"))).ok
        (tmp_path / "not-a-folder").write_text("")
        world.reconciler.intent.file = tmp_path / "not-a-folder" / "tiny.json"
        for call in (world.api.load("new", str(world.allowed / "a1")),
                     world.api.load("kept", str(world.allowed / "a1"), replace=True),
                     world.api.unload("kept"), world.api.unload("beta")):
            answer = await call
            assert answer.status == 500 and "not-a-folder" in answer.message, answer
        intent = world.reconciler.intent
        assert intent.loaded == {"kept": world.allowed / "a1"} and intent.unloaded == {}
        await world.settle()
        assert {"kept", "beta"} <= set(world.backend.served) and "new" not in world.backend.served

    asyncio.run(scenario())


def test_api_bodies_that_are_not_a_json_object_get_a_400_in_either_form(world):
    """(An API call's body is a name and a path: 64 KiB at most.)"""
    from entrypoint.backends.vllm import VLLMBackend
    from entrypoint.gateway.api_routes import MAX_API_BODY_BYTES
    from entrypoint.gateway.app import build_app
    from entrypoint.gateway.state import GatewayState
    from entrypoint.gateway.upstream import Upstream

    state = GatewayState(served_name="tiny", backend=VLLMBackend(), registry=world.registry,
                         client=Upstream("http://127.0.0.1:9"), api=world.api)

    async def post(path: str, content: bytes) -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await client.post(path, content=content)

    deep = b'{"lora_name": "x", "lora_path": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    for content, message in ((b"{nope", "not valid JSON"), (b"[1]", "must be a JSON object"),
                             (deep, "nested too deeply"),  # (was a 500 with a traceback)
                             (b"x" * (MAX_API_BODY_BYTES + 1), "over 64 KiB")):
        vllm = asyncio.run(post("/v1/load_lora_adapter", content))
        assert vllm.status_code in (400, 413) and message in vllm.json()["error"]["message"]
        sglang = asyncio.run(post("/load_lora_adapter", content))
        assert sglang.status_code == 400 and message in sglang.json()["error_message"]
        assert sglang.json()["success"] is False
    assert world.backend.calls == []


def test_a_path_whose_link_cannot_be_read_is_a_403_and_no_answer_says_where_links_lead(
        world, library, monkeypatch):
    """`/proc/1/cwd` (a link another user's process owns) made `os.path.realpath` raise
    PermissionError: a 500. And the 403 for `/proc/self/cwd` told the caller where it leads."""
    secret = world.outside / "secret-place"
    copy_adapter(library / "alpha", secret)
    (world.allowed / "leads-out").symlink_to(secret)
    unreadable = world.allowed / "unreadable"
    unreadable.symlink_to(secret)
    plain_readlink = os.readlink

    def readlink(path, *args, **kwargs):
        if os.fspath(path) == str(unreadable):
            raise PermissionError(13, "Permission denied", str(path))
        return plain_readlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "readlink", readlink)

    async def scenario():
        for path in (str(unreadable), "/proc/1/cwd", "/proc/self/cwd", "/proc/self/exe",
                     str(world.allowed / "leads-out")):
            answer = await world.api.load("probe", path)
            assert answer.status in (403, 404), (path, answer)
            assert "secret-place" not in answer.message and str(world.outside) not in \
                answer.message, answer.message
            if answer.status == 403:
                assert "NIM_PEFT_API_ALLOWED_PATHS" in answer.message
        assert world.backend.calls == [] and world.kept() == {}

    asyncio.run(scenario())


def test_the_api_may_load_so_many_adapters_and_identical_files_are_stored_once(
        world, library, tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    world.reconciler.snapshots = store
    world.api.max_adapters = 30
    copy_adapter(library / "alpha", world.allowed / "same")
    size = sum((world.allowed / "same" / f).stat().st_size
               for f in ("adapter_config.json", "adapter_model.safetensors"))

    def disk() -> int:  # bytes on disk: each inode once
        seen = {}
        for file in store.root.rglob("*"):
            if file.is_file():
                seen[file.stat().st_ino] = file.stat().st_size
        return sum(seen.values())

    async def scenario():
        for i in range(30):
            answer = await world.api.load(f"copy-{i}", str(world.allowed / "same"))
            assert answer.ok, answer
        assert len(list(store.root.iterdir())) == 30  # a folder per name ...
        assert size <= disk() < size * 1.1  # ... and the files once
        over = await world.api.load("copy-30", str(world.allowed / "same"))
        assert over.status == 400 and "NIM_PEFT_API_MAX_ADAPTERS" in over.message
        assert world.registry.get("copy-30") is None and "copy-30" not in world.kept()["loaded"]
        assert (await world.api.unload("copy-0")).ok
        assert (await world.api.load("copy-30", str(world.allowed / "same"))).ok
        served = world.backend.served
        assert len(served) == 30 and all(os.path.isdir(path) for path in served.values())

    asyncio.run(scenario())


def test_parallel_loads_of_new_names_never_pass_the_api_limit(world, library):
    """Calls for different names run in parallel: each may pass the first check while the
    others inspect their folders; the limit is checked again before the intent changes."""
    world.api.max_adapters = 3
    copy_adapter(library / "alpha", world.allowed / "same")

    async def scenario():
        answers = await asyncio.gather(*[
            world.api.load(f"par-{i}", str(world.allowed / "same")) for i in range(8)])
        assert sum(answer.ok for answer in answers) == 3, answers
        assert all("NIM_PEFT_API_MAX_ADAPTERS" in a.message for a in answers if not a.ok)
        assert len(world.kept()["loaded"]) == 3 and len(world.backend.served) == 3

    asyncio.run(scenario())
