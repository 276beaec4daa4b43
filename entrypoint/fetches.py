"""Fetches: the downloads of adapter files under way (`s3://`, `hf://`), how far each has got,
and what all of them have cost.

Download threads record here; `/v1/adapters` shows a fetch's progress, the log shows a long
one progressing (every PROGRESS_LOG_SECS), the metrics count them. Thread-safe. Does no I/O of
its own: a fetch that cannot count its bytes as they arrive (the Hub's client writes them
itself) passes a function that measures them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("entrypoint.fetches")

#: a fetch running longer than this says how far it has got, and again each time as long
PROGRESS_LOG_SECS = 10.0
MIB = 1 << 20


def mib(count: int) -> str:
    return f"{count / MIB:.1f} MiB"


def bytes_under(folder: Path) -> int:
    """The bytes of the files under `folder` (a fetch's partial files; links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for file in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, file)).st_size
    return total


@dataclass
class Fetch:
    """One download under way: adapter `name` from `url`, `total` bytes (0: not known)."""

    name: str
    url: str
    total: int
    done: int = 0
    #: measures the bytes done where they are not counted with `add` (None: counted)
    measure: Callable[[], int] | None = None
    started: float = field(default_factory=time.monotonic)
    logged: float = field(default_factory=time.monotonic)

    def add(self, count: int) -> None:
        """`count` more bytes arrived (from the download's thread)."""
        self.done += count

    def counted(self, count: int) -> None:
        """The bytes done are `count`, measured no more (its files are about to move)."""
        self.done, self.measure = count, None

    def bytes_done(self) -> int:
        if self.measure is None:
            return self.done
        try:
            return self.measure()
        except OSError:  # (its files moved as it ended)
            return self.done

    def shown(self) -> str:
        done = self.bytes_done()
        if not self.total:
            return f"{mib(done)} so far"
        return f"{mib(done)} of {mib(self.total)} ({100 * done // self.total}%)"


@dataclass(frozen=True)
class FetchTotals:
    """What the fetches that ended cost: for the metrics."""

    succeeded: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    running: int = 0


class FetchLog:
    """The fetches under way by adapter name, and the totals of those that ended."""

    def __init__(self, *, progress_every: float = PROGRESS_LOG_SECS) -> None:
        self.progress_every = progress_every
        self._lock = threading.Lock()
        self._running: dict[str, Fetch] = {}
        self._totals = FetchTotals()
        self._ticker: threading.Thread | None = None

    def begin(self, name: str, url: str, total: int,
              measure: Callable[[], int] | None = None) -> Fetch:
        """A download of adapter `name` starts (pair with `end`)."""
        fetch = Fetch(name, url, total, measure=measure)
        with self._lock:
            self._running[name] = fetch
            if self._ticker is None or not self._ticker.is_alive():
                self._ticker = threading.Thread(target=self._log_progress, daemon=True,
                                                name="fetch-progress")
                self._ticker.start()
        return fetch

    def end(self, fetch: Fetch, *, ok: bool) -> None:
        """The download ended (`ok`: its files are all there)."""
        took, done = time.monotonic() - fetch.started, fetch.bytes_done()
        with self._lock:
            if self._running.get(fetch.name) is fetch:
                del self._running[fetch.name]
            t = self._totals
            self._totals = FetchTotals(t.succeeded + ok, t.failed + (not ok), t.bytes + done,
                                       t.seconds + took)
        if ok and took >= self.progress_every:
            log.info("adapter %s: fetched %s from %s in %.0f s", fetch.name, mib(done),
                     fetch.url, took)

    def progress(self, name: str) -> tuple[int, int] | None:
        """(bytes done, bytes in all; 0: not known) of the fetch of `name` under way."""
        with self._lock:
            fetch = self._running.get(name)
        return None if fetch is None else (fetch.bytes_done(), fetch.total)

    def totals(self) -> FetchTotals:
        with self._lock:
            t = self._totals
            return FetchTotals(t.succeeded, t.failed, t.bytes, t.seconds, len(self._running))

    def _log_progress(self) -> None:
        """Say how far each long fetch has got, every `progress_every` seconds, while any
        runs (a thread of its own: a download's thread is inside the client's call)."""
        while True:
            time.sleep(min(1.0, self.progress_every))
            now = time.monotonic()
            with self._lock:
                if not self._running:
                    self._ticker = None
                    return
                due = [f for f in self._running.values() if now - f.logged >= self.progress_every]
                for fetch in due:
                    fetch.logged = now
            for fetch in due:
                try:
                    log.info("adapter %s: fetching from %s: %s after %.0f s", fetch.name,
                             fetch.url, fetch.shown(), now - fetch.started)
                except Exception:  # noqa: BLE001 - a log line must never stop the others
                    log.exception("adapter %s: cannot say how far its fetch has got",
                                  fetch.name)


#: the process's fetches (sources record here unless given another, as tests do)
FETCHES = FetchLog()
