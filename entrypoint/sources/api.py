"""The runtime API as a source: the adapters loaded through it, and the folder adapters it
unloaded, as the reconciler sees them at each pass.

Reads the standing requests (`Intent`) and the folders they name; an API adapter's folder is
re-read only when its files change, and its confinement to the allowed folders is checked every
time. An adapter loaded from an s3:// or hf:// URI is fetched by `RemoteAdapters` under its own
downloads folder, its URI checked against the allowed prefixes every pass. Must not call a
backend or change the intent except to forget an unload whose files changed or went.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from entrypoint.adapters.files import list_folder
from entrypoint.adapters.folder import AdapterFolder, Origin, inspect_folder
from entrypoint.adapters.names import outside_roots
from entrypoint.adapters.rank import RankLimit
from entrypoint.adapters.uris import VARIABLE, uri_problem
from entrypoint.sources.intent import Intent, Location
from entrypoint.sources.remote import RemoteAdapters, parse_uri

log = logging.getLogger("entrypoint.reconcile")


@dataclass(frozen=True)
class ApiRemote:
    """Where adapters the API loads from a URI are downloaded, and the prefixes allowed."""

    downloads: Path
    uris: tuple[str, ...]


class ApiAdapters:
    """What the API's intent adds to, and takes from, the sources' adapters."""

    def __init__(self, intent: Intent, roots: tuple[Path, ...], *,
                 limit: RankLimit | None, served_name: str | None,
                 uris: tuple[str, ...] = (), remote: RemoteAdapters | None = None) -> None:
        self.intent, self.roots, self.uris = intent, roots, uris
        self.limit, self.served_name = limit, served_name
        self.remote = remote  # None: no URI is fetched (no downloads folder)
        self._known: dict[str, AdapterFolder] = {}  # the API adapters' last inspection
        #: folder adapters unloaded by the API, while their files are the ones unloaded
        self.hidden: dict[str, AdapterFolder] = {}

    @property
    def snapshot_roots(self) -> tuple[Path, ...]:
        """Where an API adapter's files may be: the allowed folders and the downloads."""
        if self.remote is None:
            return self.roots
        return (*self.roots, Path(os.path.realpath(self.remote.downloads)))

    def scan(self, loaded: dict[str, Location] | None = None) -> list[AdapterFolder]:
        """The folders of the adapters loaded through the API (`loaded`: a copy of the intent's
        loads, taken on the event loop; file work: run in a thread)."""
        items = sorted((self.intent.loaded if loaded is None else loaded).items())
        known: dict[str, AdapterFolder] = {}
        for name, where in items:
            known[name] = self._inspect(name, where) if isinstance(where, Path) else \
                self._fetched(name, where)
        self._known = known
        if self.remote is not None:
            self.remote.keep({name for name, where in items if isinstance(where, str)})
        return list(known.values())

    def last(self, name: str) -> AdapterFolder | None:
        """What the last pass saw of API adapter `name`."""
        return self._known.get(name)

    def _fetched(self, name: str, uri: str) -> AdapterFolder:
        """An adapter loaded from a URI: fetched while the URI is allowed."""
        problem = uri_problem(uri, self.uris)
        if problem is None and self.remote is None:
            problem = "URIs are not fetched here"
        if problem is not None:
            return AdapterFolder(name=name, path=Path(os.devnull), fingerprint=f"uri:{uri}",
                                 origin=Origin.API, url=uri, problem=f"{problem} (or unload "
                                 f"it; {VARIABLE} is read at start)")
        assert self.remote is not None
        return replace(self.remote.folder(parse_uri(name, uri)), origin=Origin.API)

    def _inspect(self, name: str, path: Path) -> AdapterFolder:
        listing = list_folder(str(path))
        old = self._known.get(name)
        if (old is not None and old.path == path and old.fingerprint == listing.fingerprint
                and not old.pending):
            folder = old
        else:
            folder = inspect_folder(path, limit=self.limit,  # (final files)
                                    served_name=self.served_name, name=name, complete=True,
                                    _listing=listing)
            folder = replace(folder, origin=Origin.API)
        problem = outside_roots(str(path), self.roots)
        if problem is not None:
            folder = replace(folder, pending=False, problem=(
                f"{problem}; unload it, or add its folder to NIM_PEFT_API_ALLOWED_PATHS"))
        return folder

    def hide(self, wanted: dict[str, AdapterFolder]) -> None:
        """Take the folder adapters unloaded through the API out of `wanted` while their files
        are the ones that were unloaded; forget the unload once they change or go."""
        self.hidden = {}
        lifted: dict[str, str | None] = {}
        for name, fingerprint in self.intent.unloaded.items():
            folder = wanted.get(name)
            if folder is not None and folder.fingerprint == fingerprint:
                self.hidden[name] = wanted.pop(name)
                continue
            lifted[name] = None
            log.info("adapter %s: its folder %s since it was unloaded through the API; "
                     "the folder decides again", name, "changed" if folder else "is gone")
        if lifted:
            self.intent.change_or_warn(unloaded=lifted)
