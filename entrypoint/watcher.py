"""Watcher: decides when to look at NIM_PEFT_SOURCE again.

File-system events (watchdog) ask for a look within tens of milliseconds, coalesced so that a copy
of many files is one scan; the NIM_PEFT_REFRESH_INTERVAL poll stays as the safety net for
filesystems that send no events. It only says "look now": the reconciler decides what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

# Events that mean "something changed". Opening or reading a file (which our own scans do) is not
# among them, or every scan would trigger the next.
CHANGE_EVENTS = {"created", "deleted", "modified", "moved", "closed"}
COALESCE_SECS = 0.05


class _Forward(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in CHANGE_EVENTS:
            self._poke()


class FolderWatcher:
    """Runs `look` on events (coalesced) and at least every `interval` seconds."""

    def __init__(
        self,
        source: Path,
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Observer | None = None
        self.event_driven = False

    def poke(self) -> None:
        """Ask for a look soon. Call from the event loop's thread."""
        self._wake.set()

    def poke_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _start_events(self) -> None:
        observer = Observer()
        try:
            observer.schedule(_Forward(self.poke_threadsafe), str(self.source), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("no file-system events for %s (%s); watching it by polling every %s s",
                        self.source, exc, self.interval)
            return
        self._observer = observer
        self.event_driven = True

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.events:
            await asyncio.to_thread(self._start_events)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
                if self._wake.is_set():
                    await asyncio.sleep(self.coalesce)  # let a burst of events finish
                self._wake.clear()
                await self.look()
        finally:
            self.stop()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
