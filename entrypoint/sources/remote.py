"""Adapters named by URI, one each: an absolute folder or `file://`, `s3://BUCKET/PREFIX` and
`hf://ORG/REPO` (at a revision). The list file and the runtime API both name adapters so; this
turns each into the `AdapterFolder` a pass sees (a download pending, done, or failed with its
reason). Must not decide what is served or talk to a backend.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from entrypoint.adapters.files import Kind
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import display_name
from entrypoint.adapters.rank import RankLimit
from entrypoint.clock import REAL, Clock
from entrypoint.sources.hub import HF_SCHEME, HubDownloads, HubRepo
from entrypoint.sources.s3_client import SCHEME as S3_SCHEME
from entrypoint.sources.s3_client import S3Url

FILE_SCHEME = "file://"


@dataclass(frozen=True)
class Entry:
    """One adapter and where it comes from (exactly one of the three)."""

    name: str
    folder: Path | None = None
    s3: S3Url | None = None
    hub: HubRepo | None = None

    @property
    def uri(self) -> str:
        if self.hub is not None:
            return self.hub.uri
        return str(self.s3) if self.s3 is not None else str(self.folder)


def parse_uri(name: str, uri: str, revision: str | None = None) -> Entry:
    """Adapter `name` at `uri`; ValueError (HubError for hf://) says what is wrong."""
    if uri.startswith(HF_SCHEME):
        return Entry(name, hub=HubRepo.parse(uri, revision))
    if revision is not None:
        raise ValueError("'revision' is for hf:// URIs only")
    if uri.startswith(S3_SCHEME):
        url = S3Url.parse(uri)
        if not url.prefix:
            raise ValueError(f"{uri} names a bucket, not an adapter; write s3://BUCKET/PREFIX")
        return Entry(name, s3=url)
    path = uri[len(FILE_SCHEME):] if uri.startswith(FILE_SCHEME) else uri
    if "://" in path or not os.path.isabs(path):
        raise ValueError(f"uri {display_name(uri)!r} is not an absolute folder, file://, "
                         "s3:// or hf:// URI")
    return Entry(name, folder=Path(os.path.normpath(path)))


class RemoteAdapters:
    """The adapters of some entries, those from a store or the Hub downloaded under
    `downloads` (`hf/` and `s3/<name>/`)."""

    def __init__(self, downloads: Path, *, limit: RankLimit | None = None,
                 served_name: str | None = None, clock: Clock = REAL,
                 s3_source: Callable[[S3Url, Path], Any] | None = None,
                 hub_api: Any = None) -> None:
        self.downloads, self.limit, self.served_name = downloads, limit, served_name
        self.hub = HubDownloads(downloads / "hf", limit=limit, served_name=served_name,
                                clock=clock, api=hub_api)
        self._s3_source = s3_source
        self._stores: dict[str, Any] = {}  # entry name -> its one-adapter S3 source

    @property
    def on_change(self) -> Callable[[], None] | None:
        return self.hub.on_done

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.hub.on_done = callback
        for store in self._stores.values():
            store.on_change = callback

    def folder(self, entry: Entry) -> AdapterFolder:
        """The adapter of `entry` as this pass sees it; a fetch that cannot even start (no S3
        client installed, a profile that does not exist) is a reason on it, never an error
        out of the pass."""
        try:
            if entry.hub is not None:
                return self.hub.folder_of(entry.name, entry.hub)
            if entry.s3 is not None:
                return self._from_store(entry)
        except Exception as exc:  # noqa: BLE001 - one adapter's failure is its own reason
            return AdapterFolder(name=entry.name, path=self.downloads / entry.name,
                                 fingerprint=f"uri:{entry.uri}", url=entry.uri, pending=True,
                                 kind=Kind.DOWNLOAD_FAILED,  # (tried again every pass)
                                 problem=f"{entry.uri} cannot be fetched: {exc}")
        assert entry.folder is not None
        return inspect_folder(entry.folder, limit=self.limit, served_name=self.served_name,
                              name=entry.name)

    def keep(self, names: set[str]) -> None:
        """Forget every entry not in `names`, and delete downloads nothing is at any more."""
        self.hub.forget(self.hub.names() - names)
        for name in set(self._stores) - names:
            self._stores.pop(name).close()
        stores = self.downloads / "s3"
        for folder in stores.iterdir() if stores.is_dir() else ():
            if folder.name not in self._stores:  # (also one a closing store finished late)
                shutil.rmtree(folder, ignore_errors=True)
        self.hub.collect()

    def wait(self) -> bool:
        """Wait for the downloads under way; False when there were none."""
        waited = self.hub.wait()
        return any([waited, *(store.wait_downloads() for store in self._stores.values())])

    def close(self) -> None:
        self.hub.close()
        for store in self._stores.values():
            store.close()

    def _from_store(self, entry: Entry) -> AdapterFolder:
        """One adapter at s3://BUCKET/PREFIX: the S3 source of its parent prefix, reading that
        one sub-prefix only."""
        assert entry.s3 is not None
        store = self._stores.get(entry.name)
        if store is None or store.single != entry.s3:
            if store is not None:
                store.close()
            store = self._stores[entry.name] = self._store(entry.s3, entry.name)
            store.on_change = self.hub.on_done
        found = store.scan()
        if store.source_problem is not None:
            return AdapterFolder(name=entry.name, path=self.downloads / entry.name,
                                 fingerprint=f"s3:{entry.name}", pending=True,
                                 problem=store.source_problem, url=str(entry.s3))
        if not found:
            return AdapterFolder(name=entry.name, path=self.downloads / entry.name,
                                 fingerprint=f"s3:{entry.name}",
                                 problem=f"no adapter at {entry.s3}")
        return replace(found[0], name=entry.name)

    def _store(self, url: S3Url, name: str) -> Any:
        if self._s3_source is not None:
            return self._s3_source(url, self.downloads / "s3" / name)
        from entrypoint.sources.s3 import S3Source

        return S3Source.single_adapter(url, downloads=self.downloads / "s3" / name,
                                       limit=self.limit, served_name=self.served_name)
