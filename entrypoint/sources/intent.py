"""Intent: what runtime API calls asked for, kept in a file so that it outlives a restart.

Two facts, both about adapters the folder alone does not explain: adapters loaded through the API
(name -> the folder they were loaded from, a `Path`, or the s3:// or hf:// URI, a `str`), and
folder adapters unloaded through the API (name -> the fingerprint of the folder's files then:
they stay unloaded until those files change). The reconciler reads both on every pass. File
work only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from entrypoint.adapters.names import name_problem
from entrypoint.adapters.uris import is_remote

log = logging.getLogger(__name__)

VERSION = 1
Location = Path | str  # a folder, or an s3:// or hf:// URI


@dataclass
class Intent:
    """The API's standing requests; `file` is where they are kept (None: not kept)."""

    file: Path | None = None
    loaded: dict[str, Location] = field(default_factory=dict)
    unloaded: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, file: Path) -> Intent:
        """The requests kept in `file`; none when it does not exist. A file that cannot be read
        is set aside (renamed `*.bad-<time>`) with one warning, and an entry that is not a valid
        name and an absolute path is dropped with one warning each: never a reason not to
        start."""
        intent = cls(file=file)
        try:
            data = json.loads(file.read_text())
            loaded, unloaded = data["loaded"], data["unloaded"]
            if not isinstance(loaded, dict) or not isinstance(unloaded, dict):
                raise TypeError("'loaded' and 'unloaded' must be objects")
        except FileNotFoundError:
            return intent
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            aside = file.with_name(f"{file.name}.bad-{int(time.time())}")
            log.warning("%s: cannot read the adapters loaded and unloaded through the API (%s); "
                        "starting without them (the file is kept as %s)", file, exc, aside.name)
            try:
                os.replace(file, aside)
            except OSError:
                pass
            return intent
        for name, path in loaded.items():
            problem = _entry_problem(name, path, path=True)
            if problem is None:
                intent.loaded[name] = path if is_remote(path) else Path(path)
            else:
                log.warning("%s: skipped the API adapter %s: %s", file, ascii(name), problem)
        for name, fingerprint in unloaded.items():
            problem = _entry_problem(name, fingerprint, path=False)
            if problem is None:
                intent.unloaded[name] = fingerprint
            else:
                log.warning("%s: skipped the API unload of %s: %s", file, ascii(name), problem)
        return intent

    def change(self, *, loaded: dict[str, Location | None] | None = None,
               unloaded: dict[str, str | None] | None = None) -> None:
        """Set (None: drop) these entries and write the file, as one change: when the file
        cannot be written the entries are as they were and OSError is raised (a decision a
        restart would not remember is not taken)."""
        before = (dict(self.loaded), dict(self.unloaded))
        _apply(self.loaded, loaded or {})
        _apply(self.unloaded, unloaded or {})
        try:
            self.save()
        except OSError:
            self.loaded, self.unloaded = before
            raise

    def change_or_warn(self, *, loaded: dict[str, Location | None] | None = None,
                       unloaded: dict[str, str | None] | None = None) -> None:
        """`change`, made even when the file cannot be written (one warning says so): for
        changes that undo or follow what already happened."""
        _apply(self.loaded, loaded or {})
        _apply(self.unloaded, unloaded or {})
        self.save_or_warn()

    def save(self) -> None:
        """Write the requests (atomically: a crash leaves the old file or the new one).
        Raises OSError when the file cannot be written. Called on the event loop, never in a
        thread: the file is small, and the dicts are only changed there."""
        if self.file is None:
            return
        data = {"version": VERSION, "loaded": {k: str(v) for k, v in sorted(self.loaded.items())},
                "unloaded": dict(sorted(self.unloaded.items()))}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.file)

    def save_or_warn(self) -> None:
        """`save`, and when the file cannot be written, say so in one warning (for changes that
        are made whether or not a restart will remember them)."""
        try:
            self.save()
        except OSError as exc:
            log.warning("cannot write %s (%s); a restart will not remember the last runtime "
                        "API change", self.file, exc.strerror or exc)


def _entry_problem(name: str, value: object, *, path: bool) -> str | None:
    """Why an entry of the file cannot be used (a hand edit, another version), or None."""
    if (problem := name_problem(name)) is not None:
        return f"the name {problem}"
    if not isinstance(value, str):
        return f"{ascii(value)} is not a string"
    if path and (not (os.path.isabs(value) or is_remote(value)) or "\0" in value):
        return f"{ascii(value)} is not an absolute path or an s3:// or hf:// URI"
    return None


def _apply(entries: dict, changes: dict) -> None:
    for name, value in changes.items():
        if value is None:
            entries.pop(name, None)
        else:
            entries[name] = value
