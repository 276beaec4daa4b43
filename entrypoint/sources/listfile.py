"""A list of adapters as the source: `NIM_PEFT_SOURCE=/etc/lora/adapters.yaml` (or `.json`).

KServe's shape, so a KServe user pastes their list:

    adapters:
      - name: sql
        uri: hf://acme/sql-lora      # a branch is followed; `revision:` pins a tag or commit
      - name: pirate
        uri: /opt/nim/loras/pirate   # or file:///opt/nim/loras/pirate
      - name: support
        uri: s3://bucket/loras/support

The file is read again at every pass (the watcher looks at its folder, so the symlink swap a
mounted ConfigMap makes counts). A file that cannot be read or parsed is `source_problem`
(nothing is unloaded for it); a bad entry is one log line naming NIM_PEFT_SOURCE and the entry,
and an entry that was good before keeps its last good form. Must not talk to a backend.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import display_name, name_problem
from entrypoint.adapters.rank import RankLimit
from entrypoint.clock import REAL, Clock
from entrypoint.sources.hub import HF_SCHEME, HubDownloads, HubError, HubRepo
from entrypoint.sources.s3_client import SCHEME as S3_SCHEME
from entrypoint.sources.s3_client import S3Url

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_LIST_BYTES = 4 << 20
FILE_SCHEME = "file://"


@dataclass(frozen=True)
class Entry:
    """One adapter of the list: its name and where it comes from (exactly one of the three)."""

    name: str
    folder: Path | None = None
    s3: S3Url | None = None
    hub: HubRepo | None = None

    @property
    def uri(self) -> str:
        if self.hub is not None:
            return self.hub.uri
        return str(self.s3) if self.s3 is not None else str(self.folder)


def is_list_file(path: Path) -> bool:
    return path.suffix.lower() in LIST_SUFFIXES


def parse_entry(item: Any) -> Entry:
    """One item of `adapters:`; ValueError says what is wrong with it."""
    if not isinstance(item, dict):
        raise ValueError("is not a mapping with 'name' and 'uri'")
    name, uri, revision = item.get("name"), item.get("uri"), item.get("revision")
    if not isinstance(name, str) or (problem := name_problem(name)) is not None:
        raise ValueError(f"name {display_name(str(name))!r} "
                         f"{problem or 'is missing or not a string'}")
    if not isinstance(uri, str) or not uri:
        raise ValueError("has no 'uri'")
    if revision is not None and not isinstance(revision, str):
        raise ValueError("'revision' must be a string")
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


def read_list(file: Path) -> list[Any]:
    """The items of the file's `adapters:` list; OSError or ValueError says why not."""
    with open(file, "rb") as handle:
        raw = handle.read(MAX_LIST_BYTES + 1)
    if len(raw) > MAX_LIST_BYTES:
        raise ValueError(f"is over {MAX_LIST_BYTES >> 20} MiB")
    text = raw.decode()
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ValueError(f"is not valid YAML ({type(exc).__name__})") from None
    items = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError("has no 'adapters:' list (KServe's shape: adapters: [{name, uri}])")
    return items


class ListSource:
    """The adapters a list file names, each from its own folder, S3 prefix or Hub repo."""

    retry_hint = "reading it again every pass"
    fatal = False

    def __init__(self, file: Path, *, downloads: Path, limit: RankLimit | None = None,
                 served_name: str | None = None, clock: Clock = REAL,
                 s3_source: Callable[[S3Url, Path], Any] | None = None,
                 hub_api: Any = None) -> None:
        self.file, self.downloads = file, downloads
        self.limit, self.served_name = limit, served_name
        self.source_problem: str | None = None
        self._entries: dict[str, Entry] = {}  # the last good form of each entry
        self._bad: dict[str, str] = {}  # what was logged for each bad item (once each)
        self.hub = HubDownloads(downloads / "hf", limit=limit, served_name=served_name,
                                clock=clock, api=hub_api)
        self._s3_source = s3_source
        self._stores: dict[str, Any] = {}  # entry name -> its one-adapter S3 source

    @property
    def label(self) -> str:
        return str(self.file)

    @property
    def watch_folder(self) -> Path:
        return self.file.parent

    @property
    def on_change(self) -> Callable[[], None] | None:
        return self.hub.on_done

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.hub.on_done = callback
        for store in self._stores.values():
            store.on_change = callback

    @property
    def roots(self) -> tuple[Path, ...]:
        folders = [e.folder for e in self._entries.values() if e.folder is not None]
        return tuple(Path(os.path.realpath(p)) for p in (*folders, self.downloads))

    def scan(self) -> list[AdapterFolder]:
        try:
            items = read_list(self.file)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            self.source_problem = f"the list file cannot be used: it {reason}" if not \
                isinstance(exc, OSError) else f"the list file cannot be read ({reason})"
            return []
        self.source_problem = None
        self._entries = self._read_entries(items)
        self.hub.forget(self.hub.names() - set(self._entries))
        folders = [self._folder(entry) for entry in self._entries.values()]
        self.hub.collect()
        return folders

    def scan_at_start(self) -> list[AdapterFolder]:
        folders = self.scan()
        for _ in range(3):
            if not self.hub.wait() and not any(s.wait_downloads() for s in self._stores.values()):
                break
            folders = self.scan()
        return folders

    def close(self) -> None:
        self.hub.close()
        for store in self._stores.values():
            store.close()

    def _read_entries(self, items: list[Any]) -> dict[str, Entry]:
        entries: dict[str, Entry] = {}
        for index, item in enumerate(items):
            try:
                entry = parse_entry(item)
            except (ValueError, HubError) as exc:
                self._report(index, item, str(exc))
                name = item.get("name") if isinstance(item, dict) else None
                if isinstance(name, str) and name in self._entries:
                    entries[name] = self._entries[name]  # its last good form serves on
                continue
            if entry.name in entries:
                self._report(index, item, f"repeats the name {entry.name!r}; the first wins")
                continue
            entries[entry.name] = entry
        return entries

    def _report(self, index: int, item: Any, problem: str) -> None:
        key = f"{index}:{problem}"
        if self._bad.get(str(index)) != key:
            self._bad[str(index)] = key
            log.error("NIM_PEFT_SOURCE=%s: entry %d (%s) %s; skipped, what it served before "
                      "serves on", self.file, index + 1, display_name(json.dumps(item,
                      default=str))[:200], problem)

    def _folder(self, entry: Entry) -> AdapterFolder:
        if entry.hub is not None:
            return self.hub.folder_of(entry.name, entry.hub)
        if entry.s3 is not None:
            return self._from_store(entry)
        assert entry.folder is not None
        return inspect_folder(entry.folder, limit=self.limit, served_name=self.served_name,
                              name=entry.name)

    def _from_store(self, entry: Entry) -> AdapterFolder:
        """One adapter at s3://BUCKET/PREFIX: the S3 source of its parent prefix, reading that
        one sub-prefix only."""
        assert entry.s3 is not None
        store = self._stores.get(entry.name)
        if store is None or store.single != entry.s3:
            if self._s3_source is None:
                from entrypoint.sources.s3 import S3Source

                def make(url: S3Url, downloads: Path) -> Any:
                    return S3Source.single_adapter(url, downloads=downloads, limit=self.limit,
                                                   served_name=self.served_name)

                self._s3_source = make
            store = self._stores[entry.name] = self._s3_source(
                entry.s3, self.downloads / "s3" / entry.name)
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
