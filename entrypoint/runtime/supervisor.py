"""Supervisor: owns the backend child process: start, readiness, log forwarding, stop, exit code.

The child runs in its own process group so that a stop reaches the engine's helper processes too
and nothing is left behind. Knows nothing of adapters or HTTP routes beyond the readiness probe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Mapping

import httpx

log = logging.getLogger(__name__)
backend_log = logging.getLogger("backend")


class BackendProcess:
    """The backend engine as a child process."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], *, label: str, raw_logs: bool = True,
        shown_argv: list[str] | None = None,
    ) -> None:
        self.argv = argv
        self.shown_argv = shown_argv or argv  # what the log shows (secrets redacted)
        self.env = dict(env)
        self.label = label
        self.raw_logs = raw_logs
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    async def start(self) -> None:
        log.info("starting %s: %s", self.label, " ".join(self.shown_argv))
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._forward_logs())

    async def _forward_logs(self) -> None:
        """Copy the child's output to our log, line by line, until it closes.

        It must never stop early: a child whose output pipe is not drained blocks on its next
        write, so a line it cannot handle is logged and the copying goes on.
        """
        assert self.process is not None and self.process.stdout is not None
        stream = self.process.stdout
        while True:
            try:
                try:
                    line = await stream.readline()
                except ValueError:  # a line over the stream limit: take what there is
                    line = await stream.read(65536)
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                self.tail.append(text)
                if self.raw_logs:
                    sys.stderr.write(text + "\n")
                    sys.stderr.flush()
                else:
                    backend_log.info(text)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep draining whatever happens
                log.exception("cannot forward a line of %s's output; going on", self.label)

    async def wait(self) -> int:
        """The child's exit code, as soon as it exits.

        `asyncio.subprocess.Process.wait()` also waits for the output pipe to close, which never
        happens while an orphaned helper (vLLM's engine core) still holds it; so poll instead.
        """
        assert self.process is not None
        while self.process.returncode is None:
            await asyncio.sleep(0.1)
        if self._pump is not None:
            await asyncio.wait({self._pump}, timeout=1)
        return self.process.returncode

    async def wait_ready(self, client: httpx.AsyncClient, path: str) -> bool:
        """Poll `path` until it answers 200 (True) or the process exits (False)."""
        assert self.process is not None
        while self.process.returncode is None:
            try:
                response = await client.get(path, timeout=5)
                if response.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        return False

    async def stop(self, *, grace: float = 20.0) -> int | None:
        """SIGTERM the backend, then SIGKILL its whole process group after `grace` seconds (or
        once it has exited). Returns the exit code.

        The signal goes to the backend's main process only, as `docker stop` would give it as
        PID 1: it shuts its engine processes down in order. Signalled all at once, vLLM's engine
        core died first and its API server logged an EngineDeadError traceback on every stop.
        """
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            self._signal_group(signal.SIGCONT)  # a stopped (hung) process handles it now
            try:
                await asyncio.wait_for(self.wait(), timeout=grace)
            except TimeoutError:
                log.warning("%s did not stop within %.0f s; killing it", self.label, grace)
        # Whatever the leader did, leave no helper process of its group behind.
        self._signal_group(signal.SIGKILL)
        return await self.wait()

    def _signal_group(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants, as PID 1 does (Linux): they are then ours to reap.

    A backend's helper processes whose parent dies are reparented to us instead of to the
    container's init, so `reap_orphans` can collect them and nothing is left as a zombie.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(keep: set[int]) -> list[int]:
    """Collect every exited child that is not in `keep` (asyncio waits for those itself).

    Peeks with WNOWAIT first, so the exit status of a child asyncio watches is never stolen.
    """
    reaped: list[int] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid == 0:
            return reaped
        if info.si_pid in keep:
            # Our backend: asyncio reaps it. Reap any other exited child individually.
            return reaped + _reap_others(keep)
        os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)


def _reap_others(keep: set[int]) -> list[int]:
    reaped = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            try:
                os.waitpid(int(entry), os.WNOHANG)
                reaped.append(int(entry))
            except ChildProcessError:
                pass
    return reaped
