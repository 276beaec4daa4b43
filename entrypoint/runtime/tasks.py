"""Tasks: the one structure every long-lived task of the service runs under.

A vital task (the gateway server, the backend watch) that fails or ends early stops the service
non-zero; a loop (the adapter loop, the health probe, the reaper) that fails is logged with its
traceback and restarted after a backoff, and stops the service when it keeps failing. Nothing
dies silently. Knows nothing of what the tasks do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

RESTART_BASE_SECS = 1.0
RESTART_MAX_SECS = 30.0
#: a loop that fails this many times within `FAILURE_WINDOW_SECS` stops the service
MAX_FAILURES = 5
FAILURE_WINDOW_SECS = 300.0


class ServiceTasks:
    """Starts, watches and cancels the service's long-lived tasks; decides the exit code."""

    def __init__(self, *, restart_base: float = RESTART_BASE_SECS) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._down: set[str] = set()  # loops waiting to be restarted after a failure
        self._failures: dict[str, list[float]] = {}
        self._stopped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.restart_base = restart_base
        self.reason = ""

    # ---- starting ----

    def vital(self, name: str, work: Awaitable[None]) -> None:
        """Run `work`; its failure, or its end before a stop, stops the service with exit 1."""
        task = asyncio.ensure_future(work)
        self._tasks[name] = task
        task.add_done_callback(lambda done: self._vital_done(name, done))

    def loop(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run `run()` for as long as the service runs, restarting it after a failure."""
        self._tasks[name] = asyncio.create_task(self._keep_running(name, run), name=name)

    # ---- reading ----

    def alive(self, name: str) -> bool:
        """True while the task `name` runs (a loop waiting to be restarted is not alive)."""
        task = self._tasks.get(name)
        return task is not None and not task.done() and name not in self._down

    @property
    def stopping(self) -> bool:
        return self._stopped.done()

    # ---- stopping ----

    def stop(self, code: int, reason: str = "") -> None:
        """Ask the service to stop with exit code `code` (the first request wins)."""
        if not self._stopped.done():
            self.reason = reason
            self._stopped.set_result(code)

    async def wait(self) -> int:
        """Until something asks the service to stop; returns the exit code."""
        return await asyncio.shield(self._stopped)

    async def finish(self, name: str, *, timeout: float) -> None:
        """Wait up to `timeout` seconds for the task `name` to end by itself."""
        task = self._tasks.get(name)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)

    async def cancel(self, *names: str) -> None:
        """Cancel the named tasks (all when none are named) and wait for them to end."""
        chosen = [self._tasks[n] for n in (names or list(self._tasks)) if n in self._tasks]
        for task in chosen:
            task.cancel()
        await asyncio.gather(*chosen, return_exceptions=True)

    # ---- internals ----

    def _vital_done(self, name: str, task: asyncio.Future[None]) -> None:
        if self.stopping or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed; stopping the service", name, exc_info=exc)
            self.stop(1, f"{name} failed: {exc!r}")
        else:
            log.error("%s ended unexpectedly; stopping the service", name)
            self.stop(1, f"{name} ended unexpectedly")

    async def _keep_running(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        attempt = 0
        while not self.stopping:
            try:
                await run()
                raise RuntimeError("returned, but it should run until the service stops")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged with its traceback; restarted below
                now = time.monotonic()
                recent = [t for t in self._failures.get(name, []) if now - t < FAILURE_WINDOW_SECS]
                recent.append(now)
                self._failures[name] = recent
                if len(recent) >= MAX_FAILURES:
                    log.error("%s failed %d times in %.0f s; stopping the service", name,
                              len(recent), FAILURE_WINDOW_SECS, exc_info=exc)
                    self.stop(1, f"{name} keeps failing: {exc!r}")
                    return
                delay = min(RESTART_MAX_SECS, self.restart_base * 2 ** attempt)
                attempt += 1
                log.error("%s failed; restarting it in %.1f s", name, delay, exc_info=exc)
                self._down.add(name)
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._down.discard(name)
