"""Runtime API loads from s3:// and hf:// URIs, against a real Hub-compatible server (olah) and
a real S3 server (SeaweedFS) on loopback: fetched only under the prefixes listed in
NIM_PEFT_API_ALLOWED_PATHS, served with the repository's weights, following its branch, kept
across a restart, and a failure leaving nothing behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from entrypoint.adapters.rank import RankLimit
from entrypoint.gateway.api import AdapterAPI
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import Registry
from entrypoint.snapshots import SnapshotStore
from entrypoint.sources.api import ApiRemote
from entrypoint.sources.intent import Intent
from tests.fakes.scripted import ScriptedBackend
from tests.hubserver import hub_environment
from tests.sources.test_s3 import upload

WEIGHTS = "adapter_model.safetensors"


class World:
    def __init__(self, tmp: Path, uris: tuple[str, ...]) -> None:
        self.tmp, self.uris = tmp, uris
        self.source = tmp / "loras"
        self.source.mkdir()
        self.file = tmp / "cache" / "intent.json"
        self.backend = ScriptedBackend()
        self.start()

    def start(self) -> None:
        self.registry = Registry()
        self.reconciler = Reconciler(
            backend=self.backend, client=httpx.AsyncClient(), registry=self.registry,
            source=self.source, served_name="tiny", rank_limit=RankLimit(16),
            snapshots=SnapshotStore(self.tmp / "snapshots"), intent=Intent.read(self.file),
            api_roots=(self.source,),
            api_remote=ApiRemote(self.tmp / "api-downloads", self.uris))
        self.api = AdapterAPI(registry=self.registry, served_name="tiny", source=self.source,
                              reconciler=self.reconciler, timeout=20)

    def served_weights(self, name: str) -> bytes:
        return (Path(self.backend.served[name]) / WEIGHTS).read_bytes()

    async def settle(self, passes: int = 2) -> None:
        for _ in range(passes):
            await self.reconciler.sync()
            await self.reconciler.wait_idle()


@pytest.fixture
def hub(hub_server, monkeypatch):
    hub_environment(monkeypatch, hub_server)
    return hub_server


def test_an_hf_uri_is_fetched_served_followed_and_kept(hub, tmp_path, library):
    first = hub.commit("acme/sql", library / "alpha")
    world = World(tmp_path, ("hf://acme",))

    async def scenario():
        answer = await world.api.load("sql", "hf://acme/sql")
        assert answer.ok, answer
        assert world.served_weights("sql") == (library / "alpha" / WEIGHTS).read_bytes()
        record = world.registry.get("sql")
        assert record.url == f"hf://acme/sql@{first[:12]}"  # /v1/adapters shows it
        again = await world.api.load("sql", "hf://acme/sql")
        assert again.status == 400 and "already been loaded" in again.message
        hub.commit("acme/sql", library / "beta")  # the branch moves on: a drained swap
        for _ in range(50):
            await world.settle()
            if world.served_weights("sql") == (library / "beta" / WEIGHTS).read_bytes():
                break
            await asyncio.sleep(0.1)
        assert world.served_weights("sql") == (library / "beta" / WEIGHTS).read_bytes()
        await world.reconciler.close()

    asyncio.run(scenario())
    assert Intent.read(world.file).loaded == {"sql": "hf://acme/sql"}
    world.backend.served.clear()  # a restart: the backend starts empty
    world.start()

    async def restarted():
        for _ in range(50):
            await world.settle()
            if "sql" in world.backend.served:
                break
            await asyncio.sleep(0.1)
        assert world.served_weights("sql") == (library / "beta" / WEIGHTS).read_bytes()
        answer = await world.api.unload("sql")
        assert answer.ok and "sql" not in world.backend.served
        await world.reconciler.close()

    asyncio.run(restarted())
    assert Intent.read(world.file).loaded == {}


@pytest.mark.parametrize("uri", [
    "hf://other/sql",  # an organisation not listed
    "hf://acmeevil/sql",  # a listed one's name as a prefix of the text only
    "hf://acme/../other/sql",
    "hf://acme/sql%2f..%2f..%2fother",
    "s3://bucket/loras/x",  # no s3:// prefix listed
])
def test_a_uri_not_allowed_is_a_403_naming_the_variable_and_nothing_is_fetched(
        hub, tmp_path, uri):
    world = World(tmp_path, ("hf://acme",))

    async def scenario():
        answer = await world.api.load("evil", uri)
        await world.reconciler.close()
        return answer

    answer = asyncio.run(scenario())
    assert answer.status == 403 and "NIM_PEFT_API_ALLOWED_PATHS" in answer.message, answer
    assert world.reconciler.intent.loaded == {} and world.backend.calls == []
    assert not (tmp_path / "api-downloads").exists() or not any(
        (tmp_path / "api-downloads").rglob("*.safetensors"))


def test_a_missing_repo_fails_the_call_with_its_reason_and_leaves_nothing(hub, tmp_path):
    world = World(tmp_path, ("hf://acme",))

    async def scenario():
        answer = await world.api.load("ghost", "hf://acme/no-such-repo")
        await world.reconciler.close()
        return answer

    answer = asyncio.run(scenario())
    assert not answer.ok and "hf://acme/no-such-repo was not found" in answer.message, answer
    assert world.reconciler.intent.loaded == {} and "ghost" not in world.backend.served
    assert world.registry.get("ghost") is None


def test_an_s3_uri_is_fetched_and_served(s3_store, bucket, tmp_path, library, monkeypatch):
    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    upload(s3_store.client(), bucket, "support", library / "gamma")
    time.sleep(2.2)  # objects older than the settle time by the store's clock: taken at once
    world = World(tmp_path, (f"s3://{bucket}/loras",))

    async def scenario():
        refused = await world.api.load("x", f"s3://{bucket}/loras-other/support")
        assert refused.status == 403
        answer = await world.api.load("support", f"s3://{bucket}/loras/support")
        assert answer.ok, answer
        await world.reconciler.close()

    asyncio.run(scenario())
    assert world.served_weights("support") == (library / "gamma" / WEIGHTS).read_bytes()
    assert world.registry.get("support").url.startswith(f"s3://{bucket}/loras/support")
