"""Registry: one state object per adapter name, and the read-only view of them.

The reconciler owns the states and changes them only through their transitions
(`AdapterState`); the gateway and the metrics read `AdapterRecord`s through the registry's
read methods. It holds data only and does no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entrypoint.adapters.folder import Origin
from entrypoint.backoff import BACKEND_CALLS, Backoff

if TYPE_CHECKING:
    from entrypoint.adapters.folder import AdapterFolder



class State(enum.StrEnum):
    PENDING = "pending"  # seen, not complete yet (being copied), or waiting for a retry
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # with a reason; stays failed until the folder's files change
    REMOVING = "removing"
    UNLOADED = "unloaded"  # a folder adapter unloaded through the API: until its files change




@dataclass(frozen=True)
class AdapterRecord:
    """What the service shows of one adapter name (read-only)."""

    name: str
    state: State
    source: Path | None = None  # the folder under NIM_PEFT_SOURCE
    loaded_path: Path | None = None  # the path the backend loaded (None when not loaded)
    version: str = ""  # fingerprint of the folder the record describes
    loaded_version: str = ""  # fingerprint of what the backend serves
    rank: int | None = None
    size: int = 0
    reason: str = ""
    since: float = field(default_factory=time.time)
    origin: Origin = Origin.FOLDER
    url: str = ""  # its object URL (an s3:// source), shown as its source

    @property
    def servable(self) -> bool:
        """Loaded and answering: ready, or reloading while the old version keeps serving."""
        return self.loaded_path is not None and self.state in (State.READY, State.LOADING)


class AdapterState:
    """Everything known of one adapter name: the record shown, and the facts that steer the
    reconciler's next step (backoff, a refusal, what was logged). Changed only through the
    transitions below; `since` moves when the state does.
    """

    __slots__ = ("record", "attempts", "retry_at", "refused", "reported", "outage")

    def __init__(self, record: AdapterRecord) -> None:
        self.record = record
        self.attempts = 0  # backend calls that failed in a row
        self.retry_at = 0.0  # monotonic time before which no work starts (backoff)
        self.refused = ""  # fingerprint of files the backend refused: failed until they change
        self.reported = ""  # the last problem logged (each is logged once)
        self.outage = ""  # the note shown while NIM_PEFT_SOURCE cannot be read

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def serving(self) -> bool:
        """The backend holds a version we serve (whatever the state)."""
        return self.record.loaded_path is not None

    def _set(self, **changes: Any) -> AdapterRecord:
        old = self.record
        new = replace(old, **changes)
        if new.state != old.state:
            new = replace(new, since=time.time())
        self.record = new
        return new

    def _describe(self, folder: AdapterFolder) -> dict[str, Any]:
        return {"source": folder.path, "version": folder.fingerprint, "rank": folder.rank,
                "size": folder.size, "origin": folder.origin, "url": folder.url}

    # ---- transitions ----

    def invalid(self, folder: AdapterFolder, reason: str) -> bool:
        """The folder's files cannot be loaded (yet): served versions keep serving, else
        pending (being copied) or failed. True when `reason` is new (log it once)."""
        new = reason != (self.record.reason if self.serving else self.reported)
        if self.serving:  # (a removal in progress is called off: the folder is back)
            self._set(state=State.READY, version=folder.fingerprint, reason=reason)
        else:
            self._set(state=State.PENDING if folder.pending else State.FAILED,
                      loaded_version="", reason=reason, **self._describe(folder))
            self.reported = reason
        return new

    def loading(self, folder: AdapterFolder) -> None:
        self._set(state=State.LOADING, reason="", **self._describe(folder))

    def waiting(self, reason: str) -> None:
        """Not loaded this time (retried later): served versions keep serving."""
        self._set(state=State.READY if self.serving else State.PENDING, reason=reason)

    def loaded(self, path: Path, version: str) -> None:
        self._set(state=State.READY, loaded_path=path, loaded_version=version, reason="")
        self.attempts, self.retry_at, self.refused, self.reported = 0, 0.0, "", ""

    def refused_by_backend(self, folder: AdapterFolder, reason: str) -> None:
        """The backend (or the snapshot's own checks) refused these files: failed (or, when an
        older version is served, that one serves on) until the folder's files change."""
        self.refused, self.attempts, self.retry_at = folder.fingerprint, 0, 0.0
        if self.serving:
            self._set(state=State.READY, version=folder.fingerprint,
                      reason=f"new files {reason}; still serving the previous version")
        else:
            self._set(state=State.FAILED, loaded_path=None, loaded_version="", reason=reason)

    def unloaded(self, reason: str) -> None:
        """The backend no longer holds what we served and will not take it back."""
        self._set(state=State.FAILED, loaded_path=None, loaded_version="", reason=reason)

    def removing(self, reason: str) -> None:
        self._set(state=State.REMOVING, reason=reason)

    def unloaded_by_api(self, folder: AdapterFolder) -> None:
        """A folder adapter unloaded through the API: shown, not served, until its files
        change."""
        self._set(state=State.UNLOADED, loaded_path=None, loaded_version="",
                  reason="unloaded through the API; change its folder's files, or load it "
                  "through the API, to serve it again", **self._describe(folder))

    def note(self, reason: str) -> None:
        """Say why, without changing the state."""
        self._set(reason=reason)

    def note_outage(self, reason: str) -> None:
        """NIM_PEFT_SOURCE cannot be read: say so, without changing the state."""
        self.outage = reason
        self._set(reason=reason)

    def outage_over(self) -> None:
        """NIM_PEFT_SOURCE can be read again: the outage's note goes, unless another reason
        replaced it meanwhile."""
        if self.outage and self.record.reason == self.outage:
            self._set(reason="")
        self.outage = ""

    def retry_later(self, now: float, backoff: Backoff = BACKEND_CALLS) -> float:
        """A backend call failed: back off exponentially. Returns the delay."""
        self.attempts += 1
        delay = backoff.delay(self.attempts)
        self.retry_at = now + delay
        return delay

    def backing_off(self, now: float) -> bool:
        return self.retry_at > now


class Registry:
    """The adapter states by name. Others read records; the reconciler (and the static start)
    add, change and drop states."""

    def __init__(self) -> None:
        self._states: dict[str, AdapterState] = {}

    # ---- the read-only view ----

    def get(self, name: str) -> AdapterRecord | None:
        state = self._states.get(name)
        return state.record if state is not None else None

    def records(self) -> list[AdapterRecord]:
        return sorted((s.record for s in self._states.values()), key=lambda r: r.name)

    def ready(self, name: str) -> AdapterRecord | None:
        """The record of `name` when it can serve requests (ready and loaded), else None."""
        state = self._states.get(name)
        return state.record if state is not None and state.record.servable else None

    def ready_names(self) -> list[str]:
        return [r.name for r in self.records() if r.servable]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in State}
        for state in self._states.values():
            counts[state.record.state.value] += 1
        return counts

    def names(self) -> set[str]:
        return set(self._states)

    # ---- for the owner ----

    def state(self, name: str) -> AdapterState | None:
        return self._states.get(name)

    def states(self) -> list[AdapterState]:
        return list(self._states.values())

    def track(self, name: str, state: State = State.PENDING, **fields: Any) -> AdapterState:
        """The state of `name`, added with this record when there is none."""
        existing = self._states.get(name)
        if existing is None:
            existing = self._states[name] = AdapterState(
                AdapterRecord(name=name, state=state, **fields))
        return existing

    def put(self, record: AdapterRecord) -> AdapterState:
        """Show `record` for its name (tests and benchmarks of the gateway; the service changes
        states only through their transitions). `since` stays while the state
        does not change."""
        existing = self._states.get(record.name)
        if existing is None:
            existing = self._states[record.name] = AdapterState(record)
        else:
            if existing.record.state == record.state:
                record = replace(record, since=existing.record.since)
            existing.record = record
        return existing

    def drop(self, name: str) -> None:
        """Forget `name` with everything known of it."""
        self._states.pop(name, None)


class Traffic:
    """Requests in flight per adapter, and a gate that holds new ones while weights are swapped.

    vLLM's in-place reload replaces the weights under running requests too, so a request that
    spans the swap would mix old and new weights. The reconciler closes the gate, waits for the
    adapter's requests to finish, swaps, and opens it again; new requests wait at the gate.
    """

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._waiting: dict[str, int] = {}  # requests held at a shut gate
        self._open: dict[str, asyncio.Event] = {}
        self._idle: dict[str, asyncio.Event] = {}

    def running(self, name: str) -> int:
        return self._running.get(name, 0)

    def busy(self) -> tuple[list[str], list[str]]:
        """The adapters with requests running, and those with requests held at their gate."""
        return sorted(self._running), sorted(self._waiting)

    async def enter(self, name: str) -> None:
        """Wait for the gate, then count a request on `name` (pair with `leave`)."""
        gate = self._open.get(name)
        if gate is not None:
            self._waiting[name] = self._waiting.get(name, 0) + 1
            try:
                await gate.wait()
            finally:
                left = self._waiting.pop(name) - 1
                if left:
                    self._waiting[name] = left
        self._running[name] = self._running.get(name, 0) + 1
        self._idle.setdefault(name, asyncio.Event()).clear()

    def leave(self, name: str) -> None:
        count = self._running.get(name, 0) - 1
        if count <= 0:
            self._running.pop(name, None)
            if name in self._idle:
                self._idle[name].set()
        else:
            self._running[name] = count

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str, *, timeout: float) -> AsyncIterator[int]:
        """Hold new requests on `name` and wait (up to `timeout`) for running ones to finish.

        Yields how many requests were still running when the wait gave up (0 normally).
        """
        gate = self._open.setdefault(name, asyncio.Event())
        gate.clear()
        try:
            if self.running(name):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle[name].wait(), timeout)
            yield self.running(name)
        finally:
            gate.set()
            self._open.pop(name, None)
