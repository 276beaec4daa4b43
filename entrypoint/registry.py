"""Registry: the one source of truth for every adapter's state (name -> record).

The reconciler writes it; the gateway routes from it and renders it. It holds data only and does
no I/O.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from pathlib import Path


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

    def update(self, name: str, **changes: object) -> AdapterRecord:
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
        if record is not None and record.loaded_path is not None and record.state in (
            State.READY, State.LOADING
        ):
            return record
        return None

    def ready_names(self) -> list[str]:
        return [r.name for r in self.records() if self.ready(r.name)]

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in State}
        for record in self._records.values():
            counts[record.state.value] += 1
        return counts
