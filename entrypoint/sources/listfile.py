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
from pathlib import Path
from typing import Any

import yaml

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.adapters.names import display_name, name_problem
from entrypoint.adapters.rank import RankLimit
from entrypoint.clock import REAL, Clock
from entrypoint.sources.hub import HubError
from entrypoint.sources.remote import Entry, RemoteAdapters, parse_uri
from entrypoint.sources.s3_client import S3Url

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_LIST_BYTES = 4 << 20


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
    return parse_uri(name, uri, revision)


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
        self.remote = RemoteAdapters(downloads, limit=limit, served_name=served_name,
                                     clock=clock, s3_source=s3_source, hub_api=hub_api)

    @property
    def label(self) -> str:
        return str(self.file)

    @property
    def watch_folder(self) -> Path:
        return self.file.parent

    @property
    def on_change(self) -> Callable[[], None] | None:
        return self.remote.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.remote.on_change = callback

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
        folders = [self.remote.folder(entry) for entry in self._entries.values()]
        self.remote.keep(set(self._entries))
        return folders

    def scan_at_start(self) -> list[AdapterFolder]:
        folders = self.scan()
        for _ in range(3):
            if not self.remote.wait():
                break
            folders = self.scan()
        return folders

    def close(self) -> None:
        self.remote.close()

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
