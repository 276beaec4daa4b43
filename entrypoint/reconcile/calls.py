"""The backend calls a reconciler makes, with what they must guarantee around them.

A swap is an unload and a fresh load under the adapter's gate (never vLLM's `load_inplace`:
vLLM keeps that flag on the request it stores and re-reads the adapter's files at every step,
docs/vllm.md); a call whose answer never came is watched until it lands or a deadline passes;
a load whose outcome is unknown keeps its snapshot longer. Must not decide what to load (the
reconciler does) or touch adapter states.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx

from entrypoint.backends import Backend, Outcome, Reply
from entrypoint.backoff import BACKEND_CALLS, Backoff
from entrypoint.reconcile.registry import Traffic
from entrypoint.snapshots import SnapshotStore

log = logging.getLogger("entrypoint.reconcile")

LATE_SWAP_WATCH_SECS = 10.0  # after a call timed out: how long the gate waits for it to land
LATE_SWAP_POLL_SECS = 0.25
DRAIN_SECS = 30.0  # longest wait for running requests before swapping or unloading an adapter
LIST_ERRORS = (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError)


class BackendCalls:
    """Loads, unloads and swaps on one backend, each with its guarantees."""

    def __init__(self, backend: Backend, client: httpx.AsyncClient, traffic: Traffic,
                 snapshots: SnapshotStore | None, wake: Callable[[], None],
                 backoff: Backoff = BACKEND_CALLS) -> None:
        self.backend, self.client, self.traffic = backend, client, traffic
        self.snapshots = snapshots
        self.wake, self.backoff = wake, backoff

    async def listed(self) -> dict[str, str] | None:
        """The backend's adapters (name -> path), or None when its list cannot be read."""
        try:
            return await self.backend.loaded(self.client)
        except LIST_ERRORS as exc:
            log.warning("cannot list the backend's adapters (%s); will retry", exc)
            return None

    async def load(self, name: str, path: Path) -> Reply:
        """One load call. When its outcome is unknown (a timeout, a dropped connection) the
        backend may still act on it later, so `path` is kept ten grace periods at least."""
        reply = await self.backend.load(self.client, name, path)
        if reply.unanswered and self.snapshots is not None:
            self.snapshots.hold(path, self.snapshots.grace * 10)
        return reply

    async def unload(self, name: str) -> Reply:
        """One unload call."""
        return await self.backend.unload(self.client, name)

    async def confirmed(self, name: str, reply: Reply) -> Reply:
        """An unload's reply, with one that timed out and then landed counted as done (else
        it could later remove a version loaded again meanwhile: seen in the chaos run on
        vLLM)."""
        if reply.unanswered and await self.watch(lambda actual: name not in actual):
            return Reply(Outcome.DONE)
        return reply

    async def swap(self, name: str, path: Path, *, previous: Path | None) -> Reply:
        """Replace the weights the backend serves under `name` by those at `path`: the one way
        to do it. The swap owns the adapter's gate: new requests wait (they never see a 404),
        running ones finish (up to DRAIN_SECS), then the weights change. When the new files are
        not taken, `previous` (the version served until now) is loaded back before the gate
        opens."""
        async with self.gate(name, "swapping weights under them"):
            gone = await self.confirmed(name, await self.unload(name))
            if gone.outcome not in (Outcome.DONE, Outcome.GONE):
                return gone  # still served as it was; the swap is retried
            reply = await self.load(name, path)
            if reply.unanswered and await self._landed_late(name, path):
                return Reply(Outcome.DONE)
            if reply.outcome is not Outcome.DONE and previous is not None:
                await self._load_back(name, previous)
            return reply

    async def _load_back(self, name: str, previous: Path) -> None:
        """The new version was not taken: the version served before serves on. A failure here
        leaves it lost; a pass is asked for after the first backoff, which sees it lost and
        restores it (nothing else may be due to run one: found in review)."""
        back = await self.load(name, previous)
        if back.outcome is not Outcome.DONE:
            delay = self.backoff.delay(1)
            log.warning("adapter %s: the previous version could not be loaded back (%s); "
                        "retrying in %.1f s", name, back.message, delay)
            asyncio.get_running_loop().call_later(delay, self.wake)

    async def _landed_late(self, name: str, path: Path) -> bool:
        """A load whose answer never came (a timeout) may still happen in the backend; were the
        gate opened now, requests could reach the name while it changes (seen in the chaos run
        on vLLM). So the gate stays shut while the backend's list is watched for `path`, up to
        LATE_SWAP_WATCH_SECS. True when it landed."""
        if await self.watch(lambda actual: actual.get(name) == str(path)):
            log.info("adapter %s: the load that timed out reached the backend after all",
                     name)
            return True
        log.warning("adapter %s: the backend did not confirm the load within %.0f s of its "
                    "timeout; the previous version serves on and the swap is retried",
                    name, LATE_SWAP_WATCH_SECS)
        return False

    async def watch(self, landed: Callable[[dict[str, str]], bool]) -> bool:
        """Watch the backend's list (up to LATE_SWAP_WATCH_SECS) until `landed(list)`: a call
        whose answer never came may still be carried out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LATE_SWAP_WATCH_SECS
        while loop.time() < deadline:
            await asyncio.sleep(LATE_SWAP_POLL_SECS)
            try:
                actual = await self.backend.loaded(self.client)
            except LIST_ERRORS:
                continue
            if landed(actual):
                return True
        return False

    @contextlib.asynccontextmanager
    async def gate(self, name: str, then: str) -> AsyncIterator[None]:
        """Hold new requests for `name` and let its running ones finish (up to DRAIN_SECS)."""
        async with self.traffic.exclusive(name, timeout=DRAIN_SECS) as still_running:
            if still_running:
                log.warning("adapter %s: %d requests still running after %.0f s; %s", name,
                            still_running, DRAIN_SECS, then)
            yield
