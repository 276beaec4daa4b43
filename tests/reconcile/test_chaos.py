"""A long seeded random run of folder operations, runtime API calls, backend faults and requests,
against the real reconciler, scanner, snapshots, gate and adapter API, with a fake backend
(seconds, thousands of operations).

After each quiet period it checks what a user would notice: every valid folder is served with
exactly its current weights; nothing removed or never valid is served; a folder whose new files
are invalid keeps serving a version it really had. All along it checks what would break a real
backend: no weights swapped or unloaded under a running request, no path loaded that does not
exist, no path deleted while a request that used it runs. The API's decisions hold: an adapter
loaded through the API is served with its folder's weights whatever the scans do, one unloaded is
gone, and a folder adapter unloaded through the API stays unloaded until its files change.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import httpx
import pytest

from entrypoint.adapters.folder import inspect_folder
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends.base import Outcome, Reply
from entrypoint.backends.vllm import VLLMBackend
from entrypoint.backoff import Backoff
from entrypoint.gateway.api import AdapterAPI
from entrypoint.reconcile import actions as actions_module
from entrypoint.reconcile import calls as calls_module
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import Registry, State
from entrypoint.snapshots import SnapshotStore
from entrypoint.sources.intent import Intent
from tests.chaos_ops import CONFIG, FOLDER_CHANGES, WEIGHTS, change_folder

NAMES = ("c-one", "c-two", "c-three", "c-four", "c-five")
API_NAMES = ("a-one", "a-two")
STORE = ("alpha", "beta", "gamma", "big")  # folders API loads read from (big: rank 64, refused)


class ChaosBackend(VLLMBackend):
    """A backend that remembers what it serves, fails when told to, and checks our manners."""

    def __init__(self, rng: random.Random, traffic) -> None:
        self.rng = rng
        self.traffic = traffic
        self.served: dict[str, str] = {}
        self.fail_rate = 0.0
        self.violations: list[str] = []
        self.faults = Counter()
        self.late = 0  # late loads still on their way

    def _fault(self, late: tuple[str, str] | None = None) -> Reply | None:
        if self.rng.random() < self.fail_rate:
            kind = self.rng.choice(["HTTP 500", "ReadTimeout", "ConnectError", "late load"])
            self.faults[kind] += 1
            if kind == "late load" and late is not None:  # timed out here, done there later
                self.late += 1
                asyncio.get_running_loop().call_later(self.rng.random() * 0.01, self._arrive,
                                                      *late)
            return Reply(Outcome.TRANSIENT, kind, unanswered=kind in ("ReadTimeout", "late load"))
        return None

    def _arrive(self, name: str, path: str) -> None:
        self.late -= 1
        if name in self.served:
            return  # vLLM answers a plain load of a served name "already loaded"
        if not (Path(path) / WEIGHTS).is_file():
            self.violations.append(f"a late load of {name} found its path deleted: {path}")
        self.served[name] = path

    async def load(self, client, name, path) -> Reply:
        await asyncio.sleep(0)
        if not (Path(path) / WEIGHTS).is_file():
            self.violations.append(f"load of {name} from a path that does not exist: {path}")
        if fault := self._fault(late=(name, str(path))):
            return fault
        if name in self.served:
            return Reply(Outcome.ALREADY_LOADED, "already loaded")
        self.served[name] = str(path)
        return Reply(Outcome.DONE)

    async def unload(self, client, name) -> Reply:
        await asyncio.sleep(0)
        if fault := self._fault():
            return fault
        if self.traffic.running(name):
            self.violations.append(f"{name} unloaded under a running request")
        return Reply(Outcome.DONE) if self.served.pop(name, None) else Reply(Outcome.GONE)

    async def loaded(self, client) -> dict[str, str]:
        if self.rng.random() < self.fail_rate:
            self.faults["list failed"] += 1
            raise httpx.ConnectError("cannot list")
        return dict(self.served)


class Chaos:
    def __init__(self, seed: int, tmp: Path, library: Path) -> None:
        self.rng = random.Random(seed)
        self.source = tmp / "loras"
        self.source.mkdir()
        self.weights = [(library / n / WEIGHTS).read_bytes() for n in ("alpha", "beta", "gamma")]
        self.config = (library / "alpha" / CONFIG).read_text()
        self.registry = Registry()
        self.snapshots = SnapshotStore(tmp / "cache", grace=0.02)
        self.store = tmp / "store"
        for name in STORE:
            shutil.copytree(library / name, self.store / name)
        self.reconciler = Reconciler(
            backend=VLLMBackend(), client=httpx.AsyncClient(), registry=self.registry,
            source=self.source, served_name="tiny", rank_limit=RankLimit(16),
            snapshots=self.snapshots, intent=Intent(file=tmp / "intent.json"),
            api_roots=(self.source, self.store), backoff=Backoff(0.001, 0.004))
        self.api = AdapterAPI(registry=self.registry, served_name="tiny", source=self.source,
                              reconciler=self.reconciler, timeout=5)
        self.calls: list[asyncio.Task] = []
        self.answers: Counter = Counter()
        self.backend = ChaosBackend(self.rng, self.reconciler.traffic)
        self.reconciler.backend = self.backend
        self.reconciler._wake = lambda: None  # the test decides when passes run
        self.ops = Counter()
        self.checks = 0
        self.violations = self.backend.violations
        self.history: dict[str, set[bytes]] = {}  # contents each name had while valid
        self.requests: list[asyncio.Task] = []

    # ---- operations on the folder ----

    def _write(self, folder: Path, weights: bytes, config: str | None = None) -> None:
        folder.mkdir(exist_ok=True)
        (folder / CONFIG).write_text(config or self.config)
        (folder / WEIGHTS).write_bytes(weights)

    def op(self) -> None:
        name = self.rng.choice(NAMES)
        folder = self.source / name
        weights = self.rng.choice(self.weights)
        kind = self.rng.choice(["rename", "rename", "slow", "replace", "replace", "remove",
                                "truncate", "json", "hostile", "fault", "behind", "calm",
                                "api-load", "api-unload", "api-unload", "api-own"])
        self.ops[kind] += 1
        if kind in FOLDER_CHANGES:
            change_folder(kind, self.source, name, weights=weights, config=self.config,
                          aged_json=True)
        elif kind == "slow":  # config first, then half the weights (a pass may see it so)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            (folder / CONFIG).write_text(self.config)
            (folder / WEIGHTS).write_bytes(weights[: len(weights) // 2])
            self.pending_rest = (folder, weights)
        elif kind == "fault":
            self.backend.fail_rate = self.rng.choice([0.3, 0.6, 1.0])
        elif kind == "behind" and self.backend.served:
            self.backend.served.pop(self.rng.choice(sorted(self.backend.served)))
            self.backend.faults["unloaded behind our back"] += 1
        elif kind == "calm":
            self.backend.fail_rate = 0.0
        elif kind == "api-load":
            path = str(self.store / self.rng.choice(STORE))
            self._call(self.api.load(self.rng.choice(API_NAMES), path,
                                     replace=self.rng.random() < 0.5))
        elif kind == "api-unload":
            self._call(self.api.unload(self.rng.choice(API_NAMES + NAMES)))
        elif kind == "api-own":  # a folder adapter loaded through the API from its own folder
            self._call(self.api.load(name, str(folder)))
        touched = {name}
        if kind != "slow" and getattr(self, "pending_rest", None):
            rest_folder, rest = self.pending_rest
            if rest_folder.is_dir() and (rest_folder / WEIGHTS).is_file():
                (rest_folder / WEIGHTS).write_bytes(rest)
            touched.add(rest_folder.name)
            self.pending_rest = None
        self._remember(touched)

    def _call(self, call) -> None:
        async def answer() -> None:
            self.answers[(await call).status] += 1

        self.calls.append(asyncio.ensure_future(answer()))

    def _remember(self, names: set[str]) -> None:
        """Record the contents the folders an operation wrote have while valid (only those
        changed: a folder's validity does not change with time once its files are whole)."""
        for name in sorted(names):
            folder = self.source / name
            if not folder.is_dir():
                continue  # removed; a pass may not have seen it before it came back
            if inspect_folder(folder, limit=RankLimit(16)).valid:
                self.history.setdefault(name, set()).add((folder / WEIGHTS).read_bytes())

    # ---- requests, as the gateway makes them ----

    async def request(self, name: str) -> None:
        traffic = self.reconciler.traffic
        if self.registry.ready(name) is None:
            return
        await traffic.enter(name)
        try:
            record = self.registry.ready(name)
            if record is None:
                return
            path = Path(self.backend.served.get(name, record.loaded_path or ""))
            await asyncio.sleep(self.rng.random() * 0.003)
            if not (path / WEIGHTS).is_file():
                self.violations.append(f"{name}: its path was deleted under a request: {path}")
        finally:
            traffic.leave(name)

    def some_requests(self) -> None:
        for _ in range(self.rng.randint(0, 4)):
            self.requests.append(asyncio.ensure_future(self.request(self.rng.choice(NAMES))))

    # ---- quiet periods and invariants ----

    async def quiet(self) -> None:
        self.backend.fail_rate = 0.0
        await asyncio.gather(*self.requests, *self.calls)
        self.requests.clear()
        self.calls.clear()
        idle = 0
        for _ in range(40):  # passes until nothing changes (retries back off a little)
            started = self.reconciler.passes
            await self.reconciler.sync()
            busy = bool(self.reconciler._work)
            await self.reconciler.wait_idle()
            await asyncio.sleep(0.001)
            # Settled: three passes in a row started no work, no retry is due or pending and
            # no late load is still on its way (each could change what is served).
            quiet = not busy and not self.backend.late and not any(
                state.attempts for state in self.registry.states())
            idle = idle + 1 if quiet and self.reconciler.passes > started else 0
            if idle >= 3:
                break
        self.check()

    def check(self) -> None:
        self.checks += 1
        intent = self.reconciler.intent
        for name in API_NAMES:
            served = self.backend.served.get(name)
            wanted = intent.loaded.get(name)
            if wanted is None:
                if served is not None or self.registry.get(name) is not None:
                    self.violations.append(f"{name}: unloaded through the API but still there")
            elif served is None or (Path(served) / WEIGHTS).read_bytes() != (
                    wanted / WEIGHTS).read_bytes():
                self.violations.append(f"{name}: loaded through the API from {wanted.name} but "
                                       f"not served with its weights ({served})")
        for name in intent.unloaded:
            record = self.registry.get(name)
            if name in self.backend.served or record is None or record.state is not State.UNLOADED:
                self.violations.append(f"{name}: unloaded through the API, yet served or not "
                                       f"shown unloaded ({record})")
        for name in NAMES:
            if name in intent.unloaded:
                continue
            folder = self.source / name
            served = self.backend.served.get(name)
            record = self.registry.get(name)
            if served is not None and not (Path(served) / WEIGHTS).is_file():
                self.violations.append(f"{name}: served from a deleted path")
                continue
            content = (Path(served) / WEIGHTS).read_bytes() if served else None
            found = inspect_folder(folder, limit=RankLimit(16)) if folder.is_dir() else None
            ready = self.registry.ready(name) is not None
            if ready != (served is not None):
                self.violations.append(f"{name}: registry ready={ready} but backend has "
                                       f"{served}")
            if found is None:
                if served is not None or record is not None:
                    self.violations.append(f"{name}: removed but still served or listed")
                self.history.pop(name, None)  # seen removed: its old versions are gone
            elif found.valid:
                if content != (folder / WEIGHTS).read_bytes():
                    self.violations.append(f"{name}: not served with its current weights")
            elif content is not None and content not in self.history.get(name, set()):
                self.violations.append(f"{name}: serves weights it never had while valid")
            elif content is None and record is not None and record.loaded_path is not None:
                self.violations.append(f"{name}: registry says loaded, backend says not")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chaos_with_a_fake_backend(library, tmp_path, monkeypatch, seed):
    monkeypatch.setattr(actions_module, "SETTLE_SECS", 0.001)
    monkeypatch.setattr(calls_module, "LATE_SWAP_WATCH_SECS", 0.04)  # late loads: <= 0.01 s
    monkeypatch.setattr(calls_module, "LATE_SWAP_POLL_SECS", 0.002)
    chaos = Chaos(seed, tmp_path, library)

    async def run() -> None:
        for i in range(1500):
            chaos.op()
            chaos.some_requests()
            if chaos.rng.random() < 0.5:
                await chaos.reconciler.sync()
            await asyncio.sleep(0)
            if i % 50 == 49:
                await chaos.quiet()
        await chaos.quiet()
        await chaos.reconciler.close()

    asyncio.run(run())
    report = {"operations": sum(chaos.ops.values()), "by kind": dict(chaos.ops),
              "faults": dict(chaos.backend.faults), "checks": chaos.checks,
              "api answers": dict(chaos.answers),
              "violations": len(chaos.violations)}
    print(json.dumps(report))
    assert not chaos.violations, chaos.violations[:10]
    assert chaos.checks >= 30 and sum(chaos.backend.faults.values()) > 100
    assert chaos.answers[200] > 50 and chaos.answers[400] > 10  # the API was really exercised
