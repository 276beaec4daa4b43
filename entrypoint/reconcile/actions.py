"""One coroutine per step `decide` can ask for, and the state transitions each makes.

Each step changes the adapter's state only through its transitions (`AdapterState`), calls the
backend only through `BackendCalls` and files only through the snapshot store. Must not decide
what to do next: it returns whether the step went through, and `decide` is asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from entrypoint.adapters.folder import AdapterFolder, Origin
from entrypoint.backends import Outcome, Reply
from entrypoint.backoff import BACKEND_CALLS, Backoff
from entrypoint.clock import REAL, Clock
from entrypoint.reconcile.calls import BackendCalls
from entrypoint.reconcile.decide import Observed, Step
from entrypoint.reconcile.registry import AdapterState, Registry, State
from entrypoint.snapshots import SnapshotChanged, SnapshotFailed, SnapshotRefused, SnapshotStore

log = logging.getLogger("entrypoint.reconcile")

SETTLE_SECS = 0.2  # look again this soon after catching a folder mid-change
STRAY = "held by the backend though not served here; unloading it"


class Counting(Protocol):
    """Where the steps count what they did (the service's metrics, or nothing)."""

    def count(self, metric: str, label: str | None = None, *, seconds: float = 0.0) -> None: ...


class NotCounting:
    def count(self, metric: str, label: str | None = None, *, seconds: float = 0.0) -> None:
        """Counts nothing (tests and tools without metrics)."""


class Actions:
    """The steps, on one registry, backend and snapshot store."""

    def __init__(self, registry: Registry, calls: BackendCalls, snapshots: SnapshotStore | None,
                 *, counts: Counting, wake: Callable[[], None],
                 roots: Callable[[AdapterFolder], tuple[Path, ...]],
                 hidden: Callable[[], Mapping[str, AdapterFolder]], clock: Clock = REAL,
                 backoff: Backoff = BACKEND_CALLS) -> None:
        self.registry, self.calls, self.snapshots = registry, calls, snapshots
        self.counts, self.wake, self.clock, self.backoff = counts, wake, clock, backoff
        self._roots = roots  # the folders a snapshot of this adapter may read
        self._hidden = hidden  # folder adapters unloaded through the API
        self._cache_problem: str | None = None  # snapshots cannot be written

    async def take(self, step: Step, name: str, seen: Observed) -> bool:
        """Carry out `step` for `name`; False when it did not go through (what follows waits
        for a later pass)."""
        if step is Step.UNLOAD_STRAY:
            return await self.unload_stray(name)
        if step is Step.REMOVE:
            await self.remove(name)
        elif step is Step.RESTORE:
            await self.restore(name)
        else:
            assert seen.folder is not None
            await self._for_folder(step, seen.folder, seen.actual)
        return True

    async def _for_folder(self, step: Step, folder: AdapterFolder,
                          actual: dict[str, str] | None) -> None:
        if step is Step.RECORD_INVALID:
            self.record_invalid(folder)
        elif step is Step.CALL_OFF_REMOVAL:
            self.call_off_removal(folder)
        elif step is Step.SETTLE:
            self.settle(folder)
        elif step is Step.LOAD:
            await self.load(folder, actual)

    async def unload_stray(self, name: str) -> bool:
        """Unload `name`, which we do not serve, from the backend. False when it failed."""
        reply = await self.calls.unload(name)
        if reply.outcome in (Outcome.DONE, Outcome.GONE):
            log.info("adapter %s: unloaded from the backend, which held it though it is not "
                     "served (a load that timed out here and reached it later)", name)
            return True
        self.retry_later(self.registry.track(name, State.REMOVING, reason=STRAY), reply.message)
        return False

    def record_invalid(self, folder: AdapterFolder) -> None:
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
            self.counts.count("failures", "invalid")
        level = logging.INFO if folder.pending else logging.WARNING
        verb = "waiting" if folder.pending else "skipped"
        log.log(level, "adapter %s: %s: %s (%s)", folder.name, verb, reason, folder.location)

    def call_off_removal(self, folder: AdapterFolder) -> None:
        state = self.registry.state(folder.name)
        assert state is not None and state.record.loaded_path is not None
        state.loaded(state.record.loaded_path, folder.fingerprint)
        log.info("adapter %s: its removal is called off: the same files are wanted again",
                 folder.name)

    def settle(self, folder: AdapterFolder) -> None:
        state = self.registry.state(folder.name)
        assert state is not None and state.record.loaded_path is not None
        retried = state.attempts > 0
        state.loaded(state.record.loaded_path, folder.fingerprint)
        if retried:
            log.info("adapter %s: the backend serves its current files after all; nothing to "
                     "retry", folder.name)

    async def load(self, folder: AdapterFolder, actual: dict[str, str] | None) -> None:
        name = folder.name
        state = self.registry.track(name, State.LOADING)
        old_path = state.record.loaded_path
        # The backend holds this name unless its list (when it could be read) says otherwise.
        swap = old_path is not None and (actual is None or name in actual)
        state.loading(folder)
        path = await self._snapshot(state, folder)
        if path is None:  # refused: failed (or the served version serves on) until files change
            return
        if isinstance(path, str):
            state.waiting(path)
            return
        started = self.clock.now()
        reply = await self._send(name, path, old_path, swap=swap)
        if reply.outcome is Outcome.DONE:
            took = self.clock.now() - started
            state.loaded(path, folder.fingerprint)
            how = "reloaded" if swap else "loaded"
            log.info("adapter %s: %s in %.0f ms (rank %s, %s)", name, how, took * 1000,
                     folder.rank, folder.location)
            self.counts.count("loads", how, seconds=took)
            if old_path is not None and old_path != path:
                await self.release(old_path)
            return
        if path != old_path:
            await self.release(path)
        self._not_loaded(state, folder, reply.outcome, reply.message, old_path is not None)

    async def _send(self, name: str, path: Path, old_path: Path | None, *, swap: bool) -> Reply:
        """A swap when the backend holds the name, else a fresh load."""
        if swap:
            return await self.calls.swap(name, path, previous=old_path)
        reply = await self.calls.load(name, path)
        if reply.outcome is Outcome.ALREADY_LOADED:  # it was there after all
            reply = await self.calls.swap(name, path, previous=old_path)
        return reply

    def _not_loaded(self, state: AdapterState, folder: AdapterFolder, outcome: Outcome,
                    message: str, serving: bool) -> None:
        if outcome is Outcome.REFUSED:
            self.counts.count("failures", "refused")
            log.warning("adapter %s: refused by the backend: %s (%s)", folder.name, message,
                        folder.location)
            state.refused_by_backend(folder, f"refused by the backend: {message}")
            return
        self.counts.count("failures", "transient")
        self.retry_later(state, message)
        state.waiting(f"{'reload' if serving else 'load'} will be retried: {message}")

    async def restore(self, name: str) -> None:
        """Load again the snapshot we serve `name` from, which the backend lost (a restart, an
        unload behind our back) while the folder's own files cannot replace it."""
        state = self.registry.state(name)
        assert state is not None and state.record.loaded_path is not None
        path = state.record.loaded_path
        reply = await self.calls.load(name, path)
        if reply.outcome is Outcome.ALREADY_LOADED:  # with other weights: put ours back
            reply = await self.calls.swap(name, path, previous=None)
        if reply.outcome in (Outcome.DONE, Outcome.ALREADY_LOADED):
            log.info("adapter %s: the backend had lost it; loaded the served version again",
                     name)
        elif reply.outcome is Outcome.TRANSIENT:
            self.retry_later(state, reply.message)
        else:
            state.unloaded(f"refused by the backend: {reply.message}")
            await self.release(path)

    async def remove(self, name: str) -> None:
        state = self.registry.state(name)
        hidden = self._hidden().get(name)
        if state is None:
            if hidden is not None:
                self.registry.track(name).unloaded_by_api(hidden)
            return
        path = state.record.loaded_path
        if path is None:
            self.forget(name)
            return
        # Closed first (new requests get 404), then drained, then unloaded; its snapshot stays
        # until nothing can need it any more (`release`).
        why = ("unloaded through the API" if hidden is not None
               or state.record.origin is Origin.API else
               "removed from the store" if state.record.url else "folder removed")
        state.removing(why)
        async with self.calls.gate(name, "unloading it, its files stay until they end"):
            reply = await self.calls.unload(name)
        reply = await self.calls.confirmed(name, reply)
        if reply.outcome in (Outcome.DONE, Outcome.GONE):
            self.forget(name)
            log.info("adapter %s: unloaded (%s)", name, why)
            self.counts.count("unloads")
            await self.release(path)
        else:
            self.retry_later(state, reply.message)

    def forget(self, name: str) -> None:
        """Drop `name`'s state, or show it unloaded when the API unloaded its folder."""
        hidden = self._hidden().get(name)
        state = self.registry.state(name)
        if hidden is not None and state is not None:
            state.unloaded_by_api(hidden)
        else:
            self.registry.drop(name)

    async def release(self, path: Path) -> None:
        """A snapshot no adapter serves any more: deleted after its grace period, unused.

        Never at once: the backend may still read it for requests it accepted (after a drain
        that timed out, or aborts still in flight), or act late on a load that timed out here
        (`BackendCalls.load` holds such a path longer; none is deleted while the backend lists
        it). Never a user's folder.
        """
        if self.snapshots is None or path.parent != self.snapshots.root or self.served(path):
            return
        self.snapshots.retire(path)
        wait = self.snapshots.next_deletion()
        asyncio.get_running_loop().call_later((wait or 0.0) + 0.1, self.wake)

    def served(self, path: Path) -> bool:
        """Some adapter is served from `path`."""
        return any(r.loaded_path == path for r in self.registry.records())

    def retry_later(self, state: AdapterState, message: str, *, quiet: bool = False) -> None:
        delay = state.retry_later(self.clock.now(), self.backoff)
        if not quiet:
            log.warning("adapter %s: backend not answering (%s); retry %d in %.1f s",
                        state.name, message, state.attempts, delay)
        asyncio.get_running_loop().call_later(delay, self.wake)

    async def _snapshot(self, state: AdapterState, folder: AdapterFolder) -> Path | str | None:
        """The path to load from (a fresh snapshot), why there is none now, or None when these
        files are refused (the state says so)."""
        if self.snapshots is None:
            return folder.path
        try:
            path = await asyncio.to_thread(self.snapshots.take, folder,
                                           roots=self._roots(folder))
        except SnapshotRefused as exc:
            self.counts.count("failures", "invalid")
            log.warning("adapter %s: not served: %s (%s)", folder.name, exc, folder.location)
            state.refused_by_backend(folder, str(exc))
            return None
        except SnapshotChanged as exc:
            log.info("adapter %s: files changed while taking a snapshot (%s); looking again",
                     folder.name, exc)
            asyncio.get_running_loop().call_later(SETTLE_SECS, self.wake)
            return "files changing; looking again"
        except SnapshotFailed as exc:
            if self._cache_problem != str(exc):  # once, not once per adapter and retry
                self._cache_problem = str(exc)
                log.error("%s (adapters wait; the ones served keep being served)", exc)
            self.retry_later(state, str(exc), quiet=True)
            return f"{exc}; will be retried"
        if self._cache_problem is not None:
            log.info("snapshots can be written again under NIM_CACHE_PATH")
            self._cache_problem = None
        return path
