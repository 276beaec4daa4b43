"""Watcher: decides when to look at NIM_PEFT_SOURCE again.

Linux inotify events on the source folder and on each adapter folder directly in it (never
deeper) ask for a look within tens of milliseconds, coalesced so that a copy of many files is one
scan; the NIM_PEFT_REFRESH_INTERVAL poll stays as the safety net (and is all there is without
inotify). It only says "look now": the reconciler decides what to do. No threads: the inotify
descriptor is read by the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from entrypoint.adapters.names import is_folder

log = logging.getLogger(__name__)

COALESCE_SECS = 0.05

# inotify(7): changes that matter (opening or reading a file, which our own scans do, does not).
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
           | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len


class Inotify:
    """One inotify descriptor (Linux): add and remove folder watches, drain its events."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd: int = fd

    def add(self, path: str) -> int:
        """Watch the folder `path` (its direct entries); returns the watch descriptor."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), CHANGES)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return int(wd)

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # already gone with its folder: harmless

    def drain(self) -> list[tuple[int, int]]:
        """Every pending event as (watch descriptor, mask); empty when there is none."""
        events: list[tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset + EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
                events.append((wd, mask))
                offset += EVENT_HEADER.size + length

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FolderWatcher:
    """Runs `look` on events (coalesced) and at least every `interval` seconds."""

    def __init__(
        self,
        source: Path | None,
        *,
        interval: float,
        look: Callable[[], Awaitable[None]],
        events: bool = True,
        coalesce: float = COALESCE_SECS,
    ) -> None:
        self.source = source
        self.interval = interval
        self.look = look
        self.events = events
        self.coalesce = coalesce
        self._wake = asyncio.Event()
        self._inotify: Inotify | None = None
        self._watched: dict[str, tuple[int, int]] = {}  # folder name ("" = source) -> (ino, wd)
        self._trouble: str | None = None  # why some folder is not watched (logged once)
        self.event_driven = False

    def poke(self) -> None:
        """Ask for a look soon. Call from the event loop's thread."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.events and self.source is not None:  # (None: an object store, polled)
            self._start_events(loop)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
                if self._wake.is_set():
                    await asyncio.sleep(self.coalesce)  # let a burst of events finish
                self._wake.clear()
                await self.look()
                if self._inotify is not None:
                    self._apply_watches(await asyncio.to_thread(self._folders))
        finally:
            self.stop(loop)

    def _start_events(self, loop: asyncio.AbstractEventLoop) -> None:
        if not sys.platform.startswith("linux"):
            log.info("no file-system events on %s; watching %s by polling every %s s",
                     sys.platform, self.source, self.interval)
            return
        try:
            self._inotify = Inotify()
        except OSError as exc:
            log.warning("no file-system events for %s (%s); watching it by polling every %s s",
                        self.source, exc.strerror, self.interval)
            return
        loop.add_reader(self._inotify.fd, self._on_events)
        self._apply_watches(self._folders())
        self.event_driven = True

    def _on_events(self) -> None:
        assert self._inotify is not None
        events = self._inotify.drain()
        gone = {wd for wd, mask in events if mask & IN_IGNORED}
        if gone:  # the kernel dropped these watches (their folder went): forget them
            self._watched = {k: v for k, v in self._watched.items() if v[1] not in gone}
        if events:
            self._wake.set()

    def _folders(self) -> dict[str, tuple[int, str]]:
        """The folders to watch: the source ("") and each non-hidden folder directly in it."""
        wanted: dict[str, tuple[int, str]] = {}
        try:
            assert self.source is not None  # (watched only when there is a folder)
            wanted[""] = (os.stat(self.source).st_ino, str(self.source))
            with os.scandir(self.source) as it:
                for entry in it:
                    if not entry.name.startswith(".") and is_folder(entry):
                        with contextlib.suppress(OSError):
                            wanted[entry.name] = (entry.stat().st_ino, entry.path)
        except OSError:
            pass  # the source is gone: the reconciler says so
        return wanted

    def _apply_watches(self, wanted: dict[str, tuple[int, str]]) -> None:
        """Watch what `wanted` lists, and nothing deeper.

        Runs after each look: new folders get a watch, replaced ones (a new inode under the
        name, a remounted source) get a new one; watches of removed folders go with them.
        """
        inotify = self._inotify
        if inotify is None:
            return
        for name, (ino, wd) in list(self._watched.items()):
            if name in wanted and wanted[name][0] != ino:
                inotify.remove(wd)
                del self._watched[name]
        trouble = None
        for name, (ino, path) in wanted.items():
            if name in self._watched:
                continue
            try:
                self._watched[name] = (ino, inotify.add(path))
            except OSError as exc:
                trouble = f"{path}: {exc.strerror}"
        if trouble is not None and trouble != self._trouble:
            log.warning("cannot watch %s for changes; it is looked at every %s s instead (raise "
                        "fs.inotify.max_user_watches if there are many adapters)",
                        trouble, self.interval)
        self._trouble = trouble

    def stop(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._inotify is not None:
            if loop is not None:
                loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
            self._watched = {}
            self.event_driven = False
