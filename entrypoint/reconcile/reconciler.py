"""Reconcile: compare what the adapter folder wants with what the backend serves, and act.

Level-triggered: each pass looks at the whole folder and the backend's whole adapter list, so
running it twice changes nothing. Work is sequential per name and parallel across names (bounded).
File work (scans, snapshots) runs in threads; backend calls go through the backend module only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from entrypoint.adapters.files import list_folder
from entrypoint.adapters.folder import AdapterFolder, Origin, inspect_folder
from entrypoint.adapters.names import outside_roots
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends import Backend, Outcome, Reply
from entrypoint.metrics import Metrics
from entrypoint.reconcile.registry import (
    RETRY_BASE_SECS,
    AdapterRecord,
    AdapterState,
    Registry,
    State,
    Traffic,
)
from entrypoint.snapshots import SnapshotChanged, SnapshotFailed, SnapshotRefused, SnapshotStore
from entrypoint.sources.base import AdapterSource
from entrypoint.sources.folder import FolderSource
from entrypoint.sources.intent import Intent

log = logging.getLogger(__name__)

SETTLE_SECS = 0.2  # look again this soon after catching a folder mid-change
LATE_SWAP_WATCH_SECS = 10.0  # after a swap timed out: how long the gate waits for it to land
LATE_SWAP_POLL_SECS = 0.25
DRAIN_SECS = 30.0  # longest wait for running requests before swapping or unloading an adapter
SOURCE_GONE = "NIM_PEFT_SOURCE is unavailable"
STRAY = "held by the backend though not served here; unloading it"


@dataclass
class _Job:
    """Work in flight for one name; `again` when a pass skipped the name meanwhile."""

    task: asyncio.Task[None]
    again: bool = False


class Reconciler:
    """Brings the backend's adapters in line with the folders under NIM_PEFT_SOURCE."""

    def __init__(
        self,
        *,
        backend: Backend,
        client: httpx.AsyncClient,
        registry: Registry,
        source: Path | None = None,
        served_name: str,
        rank_limit: RankLimit | None,
        scanner: AdapterSource | None = None,
        snapshots: SnapshotStore | None = None,
        traffic: Traffic | None = None,
        metrics: Metrics | None = None,
        parallel: int = 8,
        wake: Callable[[], None] | None = None,
        intent: Intent | None = None,
        api_roots: Sequence[Path] = (),
    ) -> None:
        self.backend = backend
        self.client = client
        self.registry = registry
        if scanner is None:  # (a folder, given as a path: the tests' shorthand)
            assert source is not None, "a source, or the folder of one"
            scanner = FolderSource(source, limit=rank_limit, served_name=served_name)
        self.scanner: AdapterSource = scanner
        self.snapshots = snapshots
        self.traffic = traffic or Traffic()
        self.metrics = metrics
        self._slots = asyncio.Semaphore(parallel)
        self._work: dict[str, _Job] = {}  # at most one per name
        self._pass = asyncio.Lock()
        self._source_problem: str | None = None  # NIM_PEFT_SOURCE missing or unreadable
        self._cache_problem: str | None = None  # snapshots cannot be written
        self._wake = wake or (lambda: None)
        #: what runtime API calls asked for (adapters loaded, folder adapters unloaded)
        self.intent = intent or Intent()
        self.api_roots = tuple(api_roots)
        self._api_known: dict[str, AdapterFolder] = {}  # the API adapters' last inspection
        self._hidden: dict[str, AdapterFolder] = {}  # folder adapters unloaded by the API
        self.passes = 0
        self.last_scan_secs = 0.0

    # ---- passes ----

    async def sync(self) -> None:
        """One pass: scan, compare, and start per-name work for every name that needs it."""
        async with self._pass:
            if self.scanner.on_change is None:
                loop = asyncio.get_running_loop()  # (a finished download asks for a pass)

                def changed() -> None:
                    loop.call_soon_threadsafe(self._wake)

                self.scanner.on_change = changed
            started = time.perf_counter()
            folders, api_folders = await asyncio.to_thread(self._scan)
            self.last_scan_secs = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.scan_seconds.observe(self.last_scan_secs)
            try:
                actual: dict[str, str] | None = await self.backend.loaded(self.client)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("cannot list the backend's adapters (%s); will retry", exc)
                actual = None
            if actual is not None:  # nothing is deleted while the backend's paths are unknown
                await self._delete_retired(set(actual.values()))
            if self._source_unavailable(self.scanner.source_problem):
                self.passes += 1
                return  # keep serving what is loaded until the folder is back
            wanted = {folder.name: folder for folder in folders}
            self._hide_unloaded(wanted)
            wanted.update((folder.name, folder) for folder in api_folders)  # the API's name wins
            known = (set(wanted) | self.registry.names() | set(actual or {})
                     | set(self._hidden))
            for name in sorted(known):
                job = self._work.get(name)
                if job is not None:
                    job.again = True  # sequential per name: look again when it ends
                    continue
                folder = wanted.get(name)
                if not self._needs_work(name, folder, actual):
                    continue
                self._work[name] = _Job(asyncio.create_task(self._run(name, folder, actual)))
            self.passes += 1

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

    def wake(self) -> None:
        """Ask for a pass soon (the watcher runs it)."""
        self._wake()

    def _scan(self) -> tuple[list[AdapterFolder], list[AdapterFolder]]:
        """The folders under NIM_PEFT_SOURCE, and the folders of adapters loaded through the API
        (each re-read only when its files changed; confinement checked every time)."""
        folders = self.scanner.scan()
        known: dict[str, AdapterFolder] = {}
        for name, path in sorted(self.intent.loaded.items()):
            listing = list_folder(str(path))
            old = self._api_known.get(name)
            if (old is not None and old.path == path and old.fingerprint == listing.fingerprint
                    and not old.pending):
                folder = old
            else:
                folder = inspect_folder(path, limit=self.scanner.limit,  # (final files)
                                        served_name=self.scanner.served_name, name=name,
                                        complete=True, _listing=listing)
                folder = replace(folder, origin=Origin.API)
            problem = outside_roots(str(path), self.api_roots)
            if problem is not None:
                folder = replace(folder, pending=False, problem=(
                    f"{problem}; unload it, or add its folder to NIM_PEFT_API_ALLOWED_PATHS"))
            known[name] = folder
        self._api_known = known
        return folders, list(known.values())

    def _hide_unloaded(self, wanted: dict[str, AdapterFolder]) -> None:
        """Take the folder adapters unloaded through the API out of `wanted` while their files
        are the ones that were unloaded; forget the unload once they change or go."""
        self._hidden = {}
        lifted = False
        for name, fingerprint in list(self.intent.unloaded.items()):
            folder = wanted.get(name)
            if folder is not None and folder.fingerprint == fingerprint:
                self._hidden[name] = wanted.pop(name)
                continue
            del self.intent.unloaded[name]
            lifted = True
            log.info("adapter %s: its folder %s since it was unloaded through the API; "
                     "the folder decides again", name, "changed" if folder else "is gone")
        if lifted:
            self.intent.save_or_warn()

    async def wait_idle(self) -> None:
        """Wait until no per-name work is in flight."""
        while self._work:
            await asyncio.gather(*[job.task for job in self._work.values()],
                                 return_exceptions=True)

    async def close(self) -> None:
        self.scanner.close()
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
                if state.record.reason.startswith(SOURCE_GONE):
                    state.note("")
            return False
        log.error("NIM_PEFT_SOURCE=%s: %s; still serving the %d adapters loaded before, %s",
                  self.scanner.label, problem, len(self.registry.ready_names()),
                  self.scanner.retry_hint)
        for state in self.registry.states():
            state.note(f"{SOURCE_GONE} ({problem}); " + (
                "still serving the version loaded before" if state.record.servable
                else "not loaded"))
        return True

    async def _delete_retired(self, backend_paths: set[str]) -> None:
        """Delete snapshots nothing has served for their grace period; plan the next look.

        `backend_paths` are the paths the backend reports loaded right now: a load we gave up
        on (a timeout) may still have reached it, and it reads such a path again later.
        """
        if self.snapshots is None:
            return
        store = self.snapshots

        def in_use(path: Path) -> bool:
            return str(path) in backend_paths or self._snapshot_in_use(path)

        deleted = await asyncio.to_thread(store.delete_retired, in_use=in_use)
        for path in deleted:
            log.debug("deleted snapshot %s", path)
        wait = store.next_deletion()
        if wait is not None:
            asyncio.get_running_loop().call_later(wait + 0.1, self._wake)

    def _snapshot_in_use(self, path: Path) -> bool:
        """A retired snapshot is still needed while its adapter has requests running."""
        return bool(self.traffic.running(path.name.rsplit("-", 1)[0])) or self._served(path)

    def _served(self, path: Path) -> bool:
        """Some adapter is served from `path`."""
        return any(r.loaded_path == path for r in self.registry.records())

    # ---- deciding ----

    def _needs_work(
        self, name: str, folder: AdapterFolder | None, actual: dict[str, str] | None
    ) -> bool:
        state = self.registry.state(name)
        if state is not None and state.backing_off(time.monotonic()):
            return False  # backing off after a transient error
        stray = self._stray(name, state, actual)
        if folder is None:
            if name in self._hidden:  # unloaded through the API: shown as such
                return stray or state is None or state.record.state is not State.UNLOADED
            return state is not None or stray
        if stray and self._keeps_previous(state, folder):
            return True  # the backend holds what we do not serve: unload it
        if self._lost(state, actual) and self._keeps_previous(state, folder):
            return True  # the backend lost the version we still serve: give it back
        if state is None:
            return True
        record = state.record
        if not folder.valid:
            # Only records the state; nothing to do when that is already recorded.
            return record.version != folder.fingerprint or record.reason != folder.problem
        if state.refused == folder.fingerprint:
            return False  # refused: failed until its files change
        if not state.serving or self._lost(state, actual):
            return True  # not loaded; unloaded behind our back, lost in a restart, moved
        if record.state is State.REMOVING:
            return True  # its folder is back (or an API unload was undone) mid-removal
        if not self._serves(record, folder):
            return True
        # Served as the folder wants: still work while a failed call's retry is due, for the
        # backend may have come to hold this very version anyway; the retry settles the record.
        return state.attempts > 0

    @staticmethod
    def _serves(record: AdapterRecord, folder: AdapterFolder) -> bool:
        """`record` serves `folder`'s current files (an API load from another folder can bring
        files with the same fingerprint, so the folder counts too)."""
        return record.loaded_version == folder.fingerprint and record.source == folder.path

    @staticmethod
    def _stray(name: str, state: AdapterState | None, actual: dict[str, str] | None) -> bool:
        """The backend holds `name` while we serve nothing under it (a load we gave up on, a
        timeout, that reached it later): it is unloaded, never left to hold stale weights."""
        return actual is not None and name in actual and (state is None or not state.serving)

    async def _unload_stray(self, name: str) -> bool:
        """Unload `name`, which we do not serve, from the backend. False when it failed."""
        reply = await self.backend.unload(self.client, name)
        if reply.outcome in (Outcome.DONE, Outcome.GONE):
            log.info("adapter %s: unloaded from the backend, which held it though it is not "
                     "served (a load that timed out here and reached it later)", name)
            return True
        self._retry_later(self.registry.track(name, State.REMOVING, reason=STRAY), reply.message)
        return False

    @staticmethod
    def _lost(state: AdapterState | None, actual: dict[str, str] | None) -> bool:
        """The backend's list (when it could be read) lacks the version of an adapter we serve."""
        return (state is not None and state.serving and actual is not None
                and actual.get(state.name) != str(state.record.loaded_path))

    @staticmethod
    def _keeps_previous(state: AdapterState | None, folder: AdapterFolder) -> bool:
        """The folder's files will not be loaded, so the previous version stays served."""
        return not folder.valid or (state is not None and state.refused == folder.fingerprint)

    async def _run(
        self, name: str, folder: AdapterFolder | None, actual: dict[str, str] | None
    ) -> None:
        try:
            async with self._slots:
                state = self.registry.state(name)
                if self._stray(name, state, actual) and (
                        folder is None or self._keeps_previous(state, folder)):
                    if not await self._unload_stray(name):
                        return  # retried after a backoff
                if folder is None:
                    await self._remove(name)
                    return
                state = self.registry.state(name)
                if self._lost(state, actual) and self._keeps_previous(state, folder):
                    await self._restore(name)
                if not folder.valid:
                    self._record_invalid(folder)
                elif self._call_off_removal(state, folder, actual):
                    pass
                elif self._served_after_all(state, folder, actual):
                    pass
                elif state is None or state.refused != folder.fingerprint:
                    await self._load(folder, actual)
        except Exception as exc:  # never let one adapter take the loop down
            log.exception("adapter %s: unexpected error while reconciling", name)
            state = self.registry.state(name)
            if state is not None:
                state.waiting(f"internal error ({exc!r}); will be retried")
                self._retry_later(state, repr(exc))
        finally:
            job = self._work.pop(name, None)
            if job is not None and job.again:
                self._wake()

    # ---- acting ----

    def _call_off_removal(self, state: AdapterState | None, folder: AdapterFolder,
                          actual: dict[str, str] | None) -> bool:
        """A removal whose unload has not happened yet, of the very files the folder holds
        again (moved out and back, an API unload undone): served again as it is. Found by the
        chaos run: it stayed `removing`, refused, while the backend held it."""
        if (state is None or state.record.state is not State.REMOVING or not state.serving
                or self._lost(state, actual)
                or state.record.loaded_version != folder.fingerprint):
            return False
        assert state.record.loaded_path is not None
        state.loaded(state.record.loaded_path, folder.fingerprint)
        log.info("adapter %s: its removal is called off: the same files are wanted again",
                 folder.name)
        return True

    def _served_after_all(self, state: AdapterState | None, folder: AdapterFolder,
                          actual: dict[str, str] | None) -> bool:
        """A retry that is not needed: the backend's list shows it serving the very snapshot we
        serve, of the folder's current files. The load that failed was redundant (sent on a
        listing read before a swap landed) or one that timed out landed later. Found by the
        chaos run on vLLM: such a failure left the record `ready` with "reload will be retried"
        for ever, since nothing else was left to do, so no retry ever came."""
        if (state is None or not state.serving or actual is None or self._lost(state, actual)
                or not self._serves(state.record, folder)):
            return False
        assert state.record.loaded_path is not None
        retried = state.attempts > 0
        state.loaded(state.record.loaded_path, folder.fingerprint)
        if retried:
            log.info("adapter %s: the backend serves its current files after all; nothing to "
                     "retry", folder.name)
        return True

    def _record_invalid(self, folder: AdapterFolder) -> None:
        reason = folder.problem or "invalid"
        state = self.registry.track(folder.name, source=folder.path)
        serving = state.serving
        if not state.invalid(folder, reason):
            return
        if serving:
            log.warning("adapter %s: new files not loaded (%s); still serving the previous "
                        "version", folder.name, reason)
            return
        if not folder.pending:
            self._count("failures", "invalid")
        level = logging.INFO if folder.pending else logging.WARNING
        verb = "waiting" if folder.pending else "skipped"
        log.log(level, "adapter %s: %s: %s (%s)", folder.name, verb, reason, folder.location)

    async def _snapshot(self, state: AdapterState, folder: AdapterFolder) -> Path | str | None:
        """The path to load from (a fresh snapshot), why there is none now, or None when these
        files are refused (the state says so)."""
        if self.snapshots is None:
            return folder.path
        roots = self.api_roots if folder.origin is Origin.API else self.scanner.roots
        try:
            path = await asyncio.to_thread(self.snapshots.take, folder, roots=roots)
        except SnapshotRefused as exc:
            self._count("failures", "invalid")
            log.warning("adapter %s: not served: %s (%s)", folder.name, exc, folder.location)
            state.refused_by_backend(folder, str(exc))
            return None
        except SnapshotChanged as exc:
            log.info("adapter %s: files changed while taking a snapshot (%s); looking again",
                     folder.name, exc)
            asyncio.get_running_loop().call_later(SETTLE_SECS, self._wake)
            return "files changing; looking again"
        except SnapshotFailed as exc:
            if self._cache_problem != str(exc):  # once, not once per adapter and retry
                self._cache_problem = str(exc)
                log.error("%s (adapters wait; the ones served keep being served)", exc)
            self._retry_later(state, str(exc), quiet=True)
            return f"{exc}; will be retried"
        if self._cache_problem is not None:
            log.info("snapshots can be written again under NIM_CACHE_PATH")
            self._cache_problem = None
        return path

    async def _load(self, folder: AdapterFolder, actual: dict[str, str] | None) -> None:
        name = folder.name
        state = self.registry.track(name, State.LOADING)
        old_path = state.record.loaded_path
        serving = old_path is not None
        # The backend holds this name unless its list (when it could be read) says otherwise.
        swap = serving and (actual is None or name in actual)
        state.loading(folder)
        path = await self._snapshot(state, folder)
        if path is None:  # refused: failed (or the served version serves on) until files change
            return
        if isinstance(path, str):
            state.waiting(path)
            return
        started = time.monotonic()
        if swap:
            reply = await self._swap(name, path, previous=old_path)
        else:
            reply = await self._send_load(name, path)
            if reply.outcome is Outcome.ALREADY_LOADED:  # it was there after all
                reply = await self._swap(name, path, previous=old_path)
        if reply.outcome is Outcome.DONE:
            state.loaded(path, folder.fingerprint)
            took = time.monotonic() - started
            log.info("adapter %s: %s in %.0f ms (rank %s, %s)", name,
                     "reloaded" if swap else "loaded", took * 1000, folder.rank,
                     folder.location)
            self._count("loads", "reloaded" if swap else "loaded", seconds=took)
            if old_path is not None and old_path != path:
                await self._release(old_path)
            return
        if path != old_path:
            await self._release(path)
        if reply.outcome is Outcome.REFUSED:
            self._count("failures", "refused")
            log.warning("adapter %s: refused by the backend: %s (%s)", name, reply.message,
                        folder.location)
            state.refused_by_backend(folder, f"refused by the backend: {reply.message}")
            return
        self._count("failures", "transient")
        self._retry_later(state, reply.message)
        state.waiting(f"{'reload' if serving else 'load'} will be retried: {reply.message}")

    async def _restore(self, name: str) -> None:
        """Load again the snapshot we serve `name` from, which the backend lost (a restart, an
        unload behind our back) while the folder's own files cannot replace it."""
        state = self.registry.state(name)
        assert state is not None and state.record.loaded_path is not None
        path = state.record.loaded_path
        reply = await self._send_load(name, path)
        if reply.outcome is Outcome.ALREADY_LOADED:  # with other weights: put ours back
            reply = await self._swap(name, path, previous=None)
        if reply.outcome in (Outcome.DONE, Outcome.ALREADY_LOADED):
            log.info("adapter %s: the backend had lost it; loaded the served version again",
                     name)
        elif reply.outcome is Outcome.TRANSIENT:
            self._retry_later(state, reply.message)
        else:
            state.unloaded(f"refused by the backend: {reply.message}")
            await self._release(path)

    async def _send_load(self, name: str, path: Path) -> Reply:
        """One load call. When its outcome is unknown (a timeout, a dropped connection) the
        backend may still act on it later, so `path` is kept ten grace periods at least."""
        reply = await self.backend.load(self.client, name, path)
        if reply.unanswered and self.snapshots is not None:
            self.snapshots.hold(path, self.snapshots.grace * 10)
        return reply

    async def _swap(self, name: str, path: Path, *, previous: Path | None) -> Reply:
        """Replace the weights the backend serves under `name` by those at `path`: the one way
        to do it.

        An unload and a fresh load, never vLLM's `load_inplace`: vLLM keeps that flag on the
        request it stores, and re-reads an adapter loaded that way from disk at every step
        (docs/vllm.md). The swap owns the adapter's gate: new requests wait (they never see a
        404), running ones finish (up to DRAIN_SECS), then the weights change. When the new
        files are not taken, `previous` (the version served until now) is loaded back before
        the gate opens.
        """
        async with self._gate(name, "swapping weights under them"):
            gone = await self.backend.unload(self.client, name)
            if gone.unanswered and await self._watch(lambda actual: name not in actual):
                gone = Reply(Outcome.DONE)  # (an unload that timed out, then landed)
            if gone.outcome not in (Outcome.DONE, Outcome.GONE):
                return gone  # still served as it was; the swap is retried
            reply = await self._send_load(name, path)
            if reply.unanswered and await self._landed_late(name, path):
                return Reply(Outcome.DONE)
            if reply.outcome is not Outcome.DONE and previous is not None:
                await self._load_back(name, previous)
            return reply

    async def _load_back(self, name: str, previous: Path) -> None:
        """The new version was not taken: the version served before serves on. A failure here
        leaves it lost; a pass is asked for after the first backoff, which sees it lost and
        restores it (nothing else may be due to run one: found in review)."""
        back = await self._send_load(name, previous)
        if back.outcome is not Outcome.DONE:
            log.warning("adapter %s: the previous version could not be loaded back (%s); "
                        "retrying in %.1f s", name, back.message, RETRY_BASE_SECS)
            asyncio.get_running_loop().call_later(RETRY_BASE_SECS, self._wake)

    async def _landed_late(self, name: str, path: Path) -> bool:
        """A load whose answer never came (a timeout) may still happen in the backend; were the
        gate opened now, requests could reach the name while it changes (seen in the chaos run
        on vLLM). So the gate stays shut while the backend's list is watched for `path`, up to
        LATE_SWAP_WATCH_SECS. True when it landed."""
        if await self._watch(lambda actual: actual.get(name) == str(path)):
            log.info("adapter %s: the load that timed out reached the backend after all",
                     name)
            return True
        log.warning("adapter %s: the backend did not confirm the load within %.0f s of its "
                    "timeout; the previous version serves on and the swap is retried",
                    name, LATE_SWAP_WATCH_SECS)
        return False

    async def _watch(self, landed: Callable[[dict[str, str]], bool]) -> bool:
        """Watch the backend's list (up to LATE_SWAP_WATCH_SECS) until `landed(list)`: a call
        whose answer never came may still be carried out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LATE_SWAP_WATCH_SECS
        while loop.time() < deadline:
            await asyncio.sleep(LATE_SWAP_POLL_SECS)
            try:
                actual = await self.backend.loaded(self.client)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                continue
            if landed(actual):
                return True
        return False

    @contextlib.asynccontextmanager
    async def _gate(self, name: str, then: str) -> AsyncIterator[None]:
        """Hold new requests for `name` and let its running ones finish (up to DRAIN_SECS)."""
        async with self.traffic.exclusive(name, timeout=DRAIN_SECS) as still_running:
            if still_running:
                log.warning("adapter %s: %d requests still running after %.0f s; %s", name,
                            still_running, DRAIN_SECS, then)
            yield

    async def _remove(self, name: str) -> None:
        state = self.registry.state(name)
        hidden = self._hidden.get(name)
        if state is None:
            if hidden is not None:
                self.registry.track(name).unloaded_by_api(hidden)
            return
        path = state.record.loaded_path
        if path is None:
            self._forget(name)
            return
        # Closed first (new requests get 404), then drained, then unloaded; its snapshot stays
        # until nothing can need it any more (`_release`).
        why = ("unloaded through the API" if hidden is not None
               or state.record.origin is Origin.API else
               "removed from the store" if state.record.url else "folder removed")
        state.removing(why)
        async with self._gate(name, "unloading it, its files stay until they end"):
            reply = await self.backend.unload(self.client, name)
        if reply.unanswered and await self._watch(lambda actual: name not in actual):
            # An unload that timed out and landed later would otherwise remove a version
            # loaded again meanwhile (its folder back); seen in the chaos run on vLLM.
            reply = Reply(Outcome.DONE)
        if reply.outcome in (Outcome.DONE, Outcome.GONE):
            self._forget(name)
            log.info("adapter %s: unloaded (%s)", name, why)
            self._count("unloads")
            await self._release(path)
        else:
            self._retry_later(state, reply.message)

    def _forget(self, name: str) -> None:
        """Drop `name`'s state, or show it unloaded when the API unloaded its folder."""
        hidden = self._hidden.get(name)
        state = self.registry.state(name)
        if hidden is not None and state is not None:
            state.unloaded_by_api(hidden)
        else:
            self.registry.drop(name)

    async def _release(self, path: Path) -> None:
        """A snapshot no adapter serves any more: deleted after its grace period, unused.

        Never at once: the backend may still read it for requests it accepted (after a drain
        that timed out, or aborts still in flight), or act late on a load that timed out here
        (`_send_load` holds such a path longer; none is deleted while the backend lists it).
        Never a user's folder.
        """
        if self.snapshots is None or path.parent != self.snapshots.root or self._served(path):
            return
        self.snapshots.retire(path)
        wait = self.snapshots.next_deletion()
        asyncio.get_running_loop().call_later((wait or 0.0) + 0.1, self._wake)

    def _count(self, metric: str, label: str | None = None, *, seconds: float = 0.0) -> None:
        if self.metrics is None:
            return
        counter = getattr(self.metrics, metric)
        (counter.labels(label) if label else counter).inc()
        if seconds:
            self.metrics.load_seconds.observe(seconds)

    def _retry_later(self, state: AdapterState, message: str, *, quiet: bool = False) -> None:
        delay = state.retry_later(time.monotonic())
        if not quiet:
            log.warning("adapter %s: backend not answering (%s); retry %d in %.1f s",
                        state.name, message, state.attempts, delay)
        asyncio.get_running_loop().call_later(delay, self._wake)
