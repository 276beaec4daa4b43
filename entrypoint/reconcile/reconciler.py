"""Reconcile: compare what the sources want with what the backend serves, and act.

Level-triggered: each pass looks at every source's whole listing and the backend's whole
adapter list, so running it twice changes nothing. Per name, `decide` (pure) says what to do and
`Actions` does it; work is sequential per name and parallel across names (bounded). File work
(scans, snapshots) runs in threads. Must not know which kind of source it reads (folder, store,
list): only `AdapterSource`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from entrypoint.adapters.folder import AdapterFolder, Origin
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends import Backend
from entrypoint.backoff import BACKEND_CALLS, Backoff
from entrypoint.clock import REAL, Clock
from entrypoint.metrics import Metrics
from entrypoint.reconcile.actions import Actions, Counting, NotCounting
from entrypoint.reconcile.calls import BackendCalls
from entrypoint.reconcile.decide import Observed, decide
from entrypoint.reconcile.registry import Registry, Traffic
from entrypoint.snapshots import SnapshotStore
from entrypoint.sources.api import ApiAdapters, ApiRemote
from entrypoint.sources.base import AdapterSource
from entrypoint.sources.folder import FolderSource
from entrypoint.sources.intent import Intent, Location
from entrypoint.sources.remote import RemoteAdapters

log = logging.getLogger("entrypoint.reconcile")

SOURCE_GONE = "NIM_PEFT_SOURCE is unavailable"


@dataclass
class _Job:
    """Work in flight for one name; `again` when a pass skipped the name meanwhile."""

    task: asyncio.Task[None]
    again: bool = False


class Reconciler:
    """Brings the backend's adapters in line with the sources (NIM_PEFT_SOURCE, the API)."""

    def __init__(
        self,
        *,
        backend: Backend,
        client: httpx.AsyncClient,
        registry: Registry,
        served_name: str,
        rank_limit: RankLimit | None,
        source: Path | None = None,
        scanner: AdapterSource | None = None,
        snapshots: SnapshotStore | None = None,
        traffic: Traffic | None = None,
        metrics: Metrics | None = None,
        parallel: int = 8,
        wake: Callable[[], None] | None = None,
        intent: Intent | None = None,
        api_roots: Sequence[Path] = (),
        api_remote: ApiRemote | None = None,
        clock: Clock = REAL,
        backoff: Backoff = BACKEND_CALLS,
    ) -> None:
        if scanner is None:  # (a folder, given as a path: the tests' shorthand)
            assert source is not None, "a source, or the folder of one"
            scanner = FolderSource(source, limit=rank_limit, served_name=served_name)
        self.scanner: AdapterSource = scanner
        self.registry = registry
        self.traffic = traffic or Traffic()
        self.metrics = metrics
        self.clock = clock
        self._wake = wake or (lambda: None)
        remote = None if api_remote is None else RemoteAdapters(
            api_remote.downloads, limit=scanner.limit, served_name=scanner.served_name,
            clock=clock)
        self.api = ApiAdapters(intent or Intent(), tuple(api_roots), limit=scanner.limit,
                               served_name=scanner.served_name,
                               uris=api_remote.uris if api_remote else (), remote=remote)
        self.calls = BackendCalls(backend, client, self.traffic, snapshots, self.wake, backoff)
        self.actions = Actions(registry, self.calls, snapshots, counts=self._counts(),
                               wake=self.wake, roots=self._roots, hidden=lambda: self.api.hidden,
                               clock=clock, backoff=backoff)
        self._slots = asyncio.Semaphore(parallel)
        self._work: dict[str, _Job] = {}  # at most one per name
        self._pass = asyncio.Lock()
        self._fetched = asyncio.Event()  # a download ended since the last `fetched`
        self._source_problem: str | None = None  # NIM_PEFT_SOURCE missing or unreadable
        self.passes = 0
        self.last_scan_secs = 0.0

    @property
    def intent(self) -> Intent:
        """What runtime API calls asked for (adapters loaded, folder adapters unloaded)."""
        return self.api.intent

    @property
    def api_roots(self) -> tuple[Path, ...]:
        return self.api.roots

    @property
    def client(self) -> httpx.AsyncClient:
        return self.calls.client

    @client.setter
    def client(self, client: httpx.AsyncClient) -> None:
        self.calls.client = client

    @property
    def backend(self) -> Backend:
        return self.calls.backend

    @backend.setter
    def backend(self, backend: Backend) -> None:
        self.calls.backend = backend

    @property
    def snapshots(self) -> SnapshotStore | None:
        return self.actions.snapshots

    @snapshots.setter
    def snapshots(self, store: SnapshotStore | None) -> None:
        self.actions.snapshots = self.calls.snapshots = store

    # ---- passes ----

    async def sync(self) -> None:
        """One pass: scan, compare, and start per-name work for every name that needs it."""
        async with self._pass:
            self._listen_for_changes()
            started = self.clock.now()
            loaded = dict(self.intent.loaded)  # (copied here: API calls change it meanwhile)
            folders, api_folders = await asyncio.to_thread(self._scan, loaded)
            self.last_scan_secs = self.clock.now() - started
            if self.metrics is not None:
                self.metrics.scan_seconds.observe(self.last_scan_secs)
            actual = await self.calls.listed()
            if actual is not None:  # nothing is deleted while the backend's paths are unknown
                await self._delete_retired(set(actual.values()))
            if self._source_unavailable(self.scanner.source_problem):
                self.passes += 1
                return  # keep serving what is loaded until the source is back
            wanted = {folder.name: folder for folder in folders}
            self.api.hide(wanted)
            wanted.update((folder.name, folder) for folder in api_folders)  # the API's name wins
            self._start_work(wanted, actual)
            self.passes += 1

    def _start_work(self, wanted: dict[str, AdapterFolder], actual: dict[str, str] | None) -> None:
        known = set(wanted) | self.registry.names() | set(actual or {}) | set(self.api.hidden)
        for name in sorted(known):
            job = self._work.get(name)
            if job is not None:
                job.again = True  # sequential per name: look again when it ends
                continue
            seen = self._observed(name, wanted.get(name), actual)
            if decide(name, self.registry.state(name), seen):
                self._work[name] = _Job(asyncio.create_task(self._run(name, seen)))

    def _observed(self, name: str, folder: AdapterFolder | None,
                  actual: dict[str, str] | None) -> Observed:
        return Observed(folder, actual, hidden=name in self.api.hidden, now=self.clock.now())

    async def converge(self, name: str, *, timeout: float) -> None:
        """Pass after pass until no work on `name` is in flight or due (up to `timeout`): a
        runtime API call answers with the outcome of the work it asked for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.sync()
            job = self._work.get(name)
            remaining = deadline - loop.time()
            if job is None or remaining <= 0:
                return
            await asyncio.wait({job.task}, timeout=remaining)

    def _fetch_done(self) -> None:
        self._fetched.set()
        self.wake()

    async def fetched(self, timeout: float) -> None:
        """Wait (up to `timeout`) until a download of some source or of the API ends."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._fetched.wait(), timeout=timeout)
        self._fetched.clear()

    def wake(self) -> None:
        """Ask for a pass soon (the watcher runs it)."""
        self._wake()

    def _listen_for_changes(self) -> None:
        """A source that sees changes between passes (a finished download) asks for one."""
        if self.scanner.on_change is not None:
            return
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(self._fetch_done)

        self.scanner.on_change = changed
        if self.api.remote is not None:
            self.api.remote.on_change = changed

    def _scan(self, loaded: dict[str, Location]
              ) -> tuple[list[AdapterFolder], list[AdapterFolder]]:
        """The source's adapters, and the API's (`loaded`: the API's loads at this pass)."""
        return self.scanner.scan(), self.api.scan(loaded)

    def _roots(self, folder: AdapterFolder) -> tuple[Path, ...]:
        """The folders a snapshot of `folder` may read."""
        return self.api.snapshot_roots if folder.origin is Origin.API else self.scanner.roots

    async def wait_idle(self) -> None:
        """Wait until no per-name work is in flight."""
        while self._work:
            await asyncio.gather(*[job.task for job in self._work.values()],
                                 return_exceptions=True)

    async def close(self) -> None:
        self.scanner.close()
        if self.api.remote is not None:
            self.api.remote.close()
        tasks = [job.task for job in self._work.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _source_unavailable(self, problem: str | None) -> bool:
        """Note a missing or unreadable NIM_PEFT_SOURCE (once); True while it lasts."""
        if problem == self._source_problem:
            return problem is not None
        self._source_problem = problem
        if problem is None:
            log.info("NIM_PEFT_SOURCE=%s can be read again; reconciling", self.scanner.label)
            for state in self.registry.states():
                state.outage_over()
            return False
        log.error("NIM_PEFT_SOURCE=%s: %s; still serving the %d adapters loaded before, %s",
                  self.scanner.label, problem, len(self.registry.ready_names()),
                  self.scanner.retry_hint)
        for state in self.registry.states():
            state.note_outage(f"{SOURCE_GONE} ({problem}); " + (
                "still serving the version loaded before" if state.record.servable
                else "not loaded"))
        return True

    async def _delete_retired(self, backend_paths: set[str]) -> None:
        """Delete snapshots nothing has served for their grace period; plan the next look.

        `backend_paths` are the paths the backend reports loaded right now: a load we gave up
        on (a timeout) may still have reached it, and it reads such a path again later.
        """
        store = self.snapshots
        if store is None:
            return

        def in_use(path: Path) -> bool:
            return str(path) in backend_paths or self._snapshot_in_use(path)

        deleted = await asyncio.to_thread(store.delete_retired, in_use=in_use)
        for path in deleted:
            log.debug("deleted snapshot %s", path)
        wait = store.next_deletion()
        if wait is not None:
            asyncio.get_running_loop().call_later(wait + 0.1, self.wake)

    def _snapshot_in_use(self, path: Path) -> bool:
        """A retired snapshot is still needed while its adapter has requests running."""
        return bool(self.traffic.running(path.name.rsplit("-", 1)[0])) or \
            self.actions.served(path)

    async def _run(self, name: str, seen: Observed) -> None:
        try:
            async with self._slots:  # (decided again: the state may have moved meanwhile)
                seen = self._observed(name, seen.folder, seen.actual)
                for step in decide(name, self.registry.state(name), seen):
                    if not await self.actions.take(step, name, seen):
                        return  # retried after a backoff
        except Exception as exc:  # never let one adapter take the loop down
            log.exception("adapter %s: unexpected error while reconciling", name)
            state = self.registry.state(name)
            if state is not None:
                state.waiting(f"internal error ({exc!r}); will be retried")
                self.actions.retry_later(state, repr(exc))
        finally:
            job = self._work.pop(name, None)
            if job is not None and job.again:
                self.wake()

    def _counts(self) -> Counting:
        return MetricCounts(self.metrics) if self.metrics is not None else NotCounting()


class MetricCounts:
    """The steps' counts, on the service's metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def count(self, metric: str, label: str | None = None, *, seconds: float = 0.0) -> None:
        counter = getattr(self.metrics, metric)
        (counter.labels(label) if label else counter).inc()
        if seconds:
            self.metrics.load_seconds.observe(seconds)
