"""Registry: the one source of truth for every adapter's state (name -> record).

The reconciler writes it; the gateway routes from it and renders it. It holds data only and does
no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class State(enum.StrEnum):
    PENDING = "pending"  # seen, not complete yet (being copied)
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # with a reason; stays failed until the folder's files change
    REMOVING = "removing"


@dataclass(frozen=True)
class AdapterRecord:
    """What we know of one adapter name."""

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

    @property
    def servable(self) -> bool:
        """Loaded and answering: ready, or reloading while the old version keeps serving."""
        return self.loaded_path is not None and self.state in (State.READY, State.LOADING)


class Registry:
    """Adapter records by name. Mutated only through `put` and `drop` (so `since` is right)."""

    def __init__(self) -> None:
        self._records: dict[str, AdapterRecord] = {}

    def get(self, name: str) -> AdapterRecord | None:
        return self._records.get(name)

    def put(self, record: AdapterRecord) -> AdapterRecord:
        """Store `record`; `since` is kept while the state does not change."""
        old = self._records.get(record.name)
        if old is not None and old.state == record.state:
            record = replace(record, since=old.since)
        self._records[record.name] = record
        return record

    def update(self, name: str, **changes: Any) -> AdapterRecord:
        """Change some fields of an existing record."""
        old = self._records[name]
        return self.put(replace(old, since=time.time(), **changes))

    def drop(self, name: str) -> None:
        self._records.pop(name, None)

    def records(self) -> list[AdapterRecord]:
        return sorted(self._records.values(), key=lambda r: r.name)

    def ready(self, name: str) -> AdapterRecord | None:
        """The record of `name` when it can serve requests (ready and loaded), else None."""
        record = self._records.get(name)
        return record if record is not None and record.servable else None

    def ready_names(self) -> list[str]:
        return [r.name for r in self.records() if self.ready(r.name)]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in State}
        for record in self._records.values():
            counts[record.state.value] += 1
        return counts


class Traffic:
    """Requests in flight per adapter, and a gate that holds new ones while weights are swapped.

    vLLM's in-place reload replaces the weights under running requests too, so a request that
    spans the swap would mix old and new weights. The reconciler closes the gate, waits for the
    adapter's requests to finish, swaps, and opens it again; new requests wait at the gate.
    """

    def __init__(self) -> None:
        self._running: dict[str, int] = {}
        self._open: dict[str, asyncio.Event] = {}
        self._idle: dict[str, asyncio.Event] = {}

    def running(self, name: str) -> int:
        return self._running.get(name, 0)

    async def enter(self, name: str) -> None:
        """Wait for the gate, then count a request on `name` (pair with `leave`)."""
        gate = self._open.get(name)
        if gate is not None:
            await gate.wait()
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
