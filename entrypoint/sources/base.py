"""What every adapter source is to the rest of the service: one small interface.

A source lists the adapters it holds as `AdapterFolder`s whose files are local and final (a
folder's own, or a finished download), says why it cannot be read (`source_problem`) instead of
ever looking empty, names the folders a snapshot may read (`roots`), and may ask for a pass
when something changed between passes (`on_change`). The reconciler and the start-up use only
this; adding a source is one module implementing it. Must not talk to a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.adapters.rank import RankLimit


class AdapterSource(Protocol):
    """Where adapters come from (NIM_PEFT_SOURCE)."""

    #: the rank limit judged against, and the served model's name (no adapter may take it)
    limit: RankLimit | None
    served_name: str | None
    #: why the last scan could not read the source (None: it could); nothing is unloaded
    #: while it lasts
    source_problem: str | None
    #: the problem is a setting to fix, not an outage to wait out
    fatal: bool
    #: what the service does while `source_problem` lasts (it logs this once)
    retry_hint: str
    #: called (from any thread) when a scan would find something new; None: nobody listens
    on_change: Callable[[], None] | None

    @property
    def label(self) -> str:
        """The source as its user wrote it (a folder, an s3:// URL)."""
        ...

    @property
    def watch_folder(self) -> Path | None:
        """The folder whose file events mean "look now" (None: none; polled every interval)."""
        ...

    @property
    def roots(self) -> tuple[Path, ...]:
        """The folders this source's adapter files live in (what a snapshot may read)."""
        ...

    def scan(self) -> list[AdapterFolder]:
        """Every adapter now, each judged; never raises (a failure is `source_problem`)."""
        ...

    def scan_at_start(self) -> list[AdapterFolder]:
        """The first scan, carried through what a pass would finish later (downloads, an
        upload caught half-way), so what is there at start is served before ready."""
        ...

    def close(self) -> None:
        """Stop background work (downloads); scans after it are not expected."""
        ...
