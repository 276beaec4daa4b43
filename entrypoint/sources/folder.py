"""The folder source: the direct sub-folders of NIM_PEFT_SOURCE, each judged as an adapter.

Reads the filesystem only; never talks to a backend, never copies files."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from entrypoint.adapters.files import list_folder
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import display_name, is_folder, leads_outside, outside_roots
from entrypoint.adapters.rank import RankLimit


def scan_source(
    source: Path, *, limit: RankLimit | None = None, served_name: str | None = None
) -> list[AdapterFolder]:
    """Every adapter folder directly under `source` (hidden ones skipped), sorted by name.

    Without `limit` no rank is refused (the start-up scan, before the limit is known)."""
    return FolderSource(source, limit=limit, served_name=served_name).scan()


class FolderSource:
    """Scans a source folder again and again; re-reads a folder only when its fingerprint moves.

    A pass over unchanged folders costs one `scandir` per folder and one `stat` per file. Results
    are kept only for folders that still exist, so memory follows the folder, not its history.
    Never raises: a missing or unreadable source is `source_problem`, not an empty folder.
    """

    def __init__(
        self, source: Path, *, limit: RankLimit | None = None, served_name: str | None = None
    ) -> None:
        self.source = source
        self.limit = limit
        self.served_name = served_name
        self._known: dict[str, AdapterFolder] = {}
        #: why the last scan could not list the source (None: it could)
        self.source_problem: str | None = None

    #: what the service does while `source_problem` lasts (it logs this once)
    retry_hint = "looking again every pass (check the volume mount)"
    fatal = False  # a folder that cannot be read may come back (a volume mounted late)
    on_change: Callable[[], None] | None = None  # (the watcher sees a folder's changes)

    @property
    def label(self) -> str:
        return str(self.source)

    @property
    def watch_folder(self) -> Path:
        return self.source

    def scan_at_start(self) -> list[AdapterFolder]:
        return self.scan()

    def close(self) -> None:
        """Nothing runs in the background."""

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where this scanner's adapter files live (what a snapshot may read)."""
        return (Path(os.path.realpath(self.source)),)

    def scan(self) -> list[AdapterFolder]:
        # Thousands of small acyclic objects: the cycle collector would only slow this down.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._scan()
        finally:
            if collecting:
                gc.enable()

    def _scan(self) -> list[AdapterFolder]:
        try:
            with os.scandir(self.source) as it:
                entries = [e for e in it if not e.name.startswith(".") and is_folder(e)]
            self.source_problem = None
        except OSError as exc:
            self.source_problem = (f"cannot be read ({exc.strerror or type(exc).__name__})"
                                   if not isinstance(exc, FileNotFoundError) else "is gone")
            return list(self._known.values())
        real_source: str | None = None
        known: dict[str, AdapterFolder] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            listing = list_folder(entry.path)
            old = self._known.get(entry.name)
            if old is not None and old.fingerprint == listing.fingerprint and not old.pending:
                known[entry.name] = old
                continue
            if entry.is_symlink():
                real_source = real_source or os.path.realpath(self.source)
                if leads_outside(entry.path, real_source):
                    known[entry.name] = AdapterFolder(
                        name=display_name(entry.name), path=Path(entry.path),
                        fingerprint=listing.fingerprint, size=listing.size,
                        problem="is a link that leads outside NIM_PEFT_SOURCE; copy the "
                        "adapter into the folder instead")
                    continue
            folder = inspect_folder(Path(entry.path), limit=self.limit,
                                    served_name=self.served_name, _listing=listing)
            if folder.valid and listing.links:
                real_source = real_source or os.path.realpath(self.source)
                out = outside_roots(entry.path, (Path(real_source),), "NIM_PEFT_SOURCE")
                if out is not None:
                    folder = replace(folder, problem=f"{out}; copy the file itself instead")
            known[entry.name] = folder
        self._known = known
        return list(known.values())


