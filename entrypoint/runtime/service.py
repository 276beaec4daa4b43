"""Service: wires the resolved start-up to the supervisor, reconciler, watcher and gateway.

One asyncio loop runs everything. Owns the signals (SIGTERM/SIGINT stop the backend gracefully and
exit 0), the exit code (non-zero when the backend dies), readiness and the backend's health loop.
Every resource it opens declares its own cleanup as it is opened, on one exit stack, so the stop
is the start in reverse. Holds no backend knowledge itself and decides nothing `resolve` decided
(that is `startup.py`); sockets and clients are made in `net.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
from collections.abc import Callable

import httpx
import uvicorn

from entrypoint import __version__
from entrypoint.config.settings import Settings, source_folder
from entrypoint.gateway.api import AdapterAPI
from entrypoint.gateway.app import build_app
from entrypoint.gateway.state import GatewayState
from entrypoint.metrics import LoraRequestsInfo, Metrics
from entrypoint.reconcile.calls import DRAIN_SECS, LATE_SWAP_WATCH_SECS
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import Registry, Traffic
from entrypoint.runtime.net import (
    GATEWAY_SERVER_OPTIONS,
    GatewayServer,
    admin_client,
    backend_headers,
    listen,
    proxy_client,
    run_event_loop,
)
from entrypoint.runtime.startup import (
    Startup,
    api_downloads_folder,
    downloads_folder,
    private_folder,
    resolve,
    snapshot_store,
    source_scanner_for,
)
from entrypoint.runtime.supervisor import BackendProcess, become_subreaper, reap_orphans
from entrypoint.runtime.tasks import ServiceTasks
from entrypoint.runtime.watcher import FolderWatcher
from entrypoint.snapshots import SnapshotStore
from entrypoint.sources.api import ApiRemote
from entrypoint.sources.s3_client import S3Url

log = logging.getLogger("entrypoint")

EXIT_OK = 0
EXIT_BACKEND_DIED = 1
ADAPTER_LOOP = "adapter loop"
HEALTH_LOOP = "backend health check"
HEALTH_PROBE_SECS = 2.0
HEALTH_PROBE_TIMEOUT_SECS = 10.0
PUBLIC_PORT_DRAIN_SECS = 10.0


class Service:
    """The running entrypoint: one backend process, the adapter loop and the public port."""

    def __init__(
        self,
        startup: Startup,
        *,
        host: str = "0.0.0.0",
        on_ready: Callable[[], None] | None = None,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.startup = startup
        self.on_ready = on_ready
        self.settings = settings = startup.settings
        self.plan = plan = startup.plan
        self.host = host
        self.snapshots = snapshots
        self.registry = Registry()
        self.traffic = Traffic()
        lora_info = None if plan.backend.reports_lora_requests else LoraRequestsInfo(
            self.traffic, settings.max_gpu_loras)
        self.metrics = Metrics(self.registry, lora_info=lora_info)
        self.tasks: ServiceTasks | None = None
        self.process = BackendProcess(plan.argv, plan.env, label=plan.backend.name,
                                      raw_logs=not settings.jsonl_logging,
                                      shown_argv=plan.shown_argv)
        self.client = admin_client(plan, settings.peft_api_timeout_secs)
        self.proxy_client = proxy_client(plan.backend_url, uds=plan.uds,
                                         headers=backend_headers(plan))
        self.gateway = GatewayState(
            served_name=settings.served_name, backend=plan.backend, registry=self.registry,
            client=self.proxy_client, readiness=self.not_ready_because,
            static_mode=not settings.dynamic, metadata=metadata(startup), metrics=self.metrics,
            api_keys=plan.api_keys, traffic=self.traffic)
        self.reconciler: Reconciler | None = None
        self.watcher: FolderWatcher | None = None
        self.adapters_synced = False  # the first pass over the adapter folder is done
        self.backend_healthy = False  # the backend's health route answered the last probe
        if settings.dynamic:
            self.reconciler, self.watcher = self._adapter_loop()
        self.gateway.api = adapter_api(settings, self.registry, self.reconciler)

    def _adapter_loop(self) -> tuple[Reconciler, FolderWatcher]:
        """The reconciler of NIM_PEFT_SOURCE and the watcher that tells it when to look."""
        settings, limit = self.settings, self.plan.rank_limit
        source, interval = settings.peft_source, settings.peft_refresh_interval
        assert source is not None and interval is not None
        scanner = source_scanner_for(settings, downloads_folder(settings), limit)
        reconciler = Reconciler(
            backend=self.plan.backend, client=self.client, registry=self.registry,
            served_name=settings.served_name, rank_limit=limit, scanner=scanner,
            snapshots=self.snapshots, traffic=self.traffic, metrics=self.metrics,
            wake=self._poke_watcher, intent=self.startup.intent, api_roots=settings.api_roots,
            api_remote=ApiRemote(api_downloads_folder(settings), tuple(settings.api_allowed_uris))
            if settings.api_allowed_uris else None)
        # (an object store sends no events here: it is listed every interval)
        watcher = FolderWatcher(scanner.watch_folder, interval=interval, look=reconciler.sync,
                                events=settings.peft_watch_events)
        return reconciler, watcher

    def _poke_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.poke()

    def not_ready_because(self) -> str | None:
        """None when the service can serve; else why not (`/v1/health/ready` says it)."""
        tasks = self.tasks
        if tasks is None or tasks.stopping:
            return "stopping" if tasks is not None else "starting"
        if not self.gateway.backend_up:
            return f"{self.plan.backend.name} is starting"
        if not self.backend_healthy:
            return f"{self.plan.backend.name} does not answer its health check"
        if not self.adapters_synced:
            return "loading the adapters found at start"
        if self.watcher is not None and not tasks.alive(ADAPTER_LOOP):
            return "the adapter loop failed and is being restarted"
        return None

    # ---- start and stop ----

    async def run(self) -> int:
        """Start, serve until a signal or the backend's death, stop; returns the exit code.

        Each resource pushes its cleanup onto one exit stack as it is opened, so the stop is the
        start in reverse, and a start that fails half-way undoes what it had done: the loops,
        the reconciler's work, the backend (SIGTERM, then its process group), the public port's
        answers in flight, the tasks left, the socket, the clients, the snapshots and downloads.
        """
        async with contextlib.AsyncExitStack() as stack:
            tasks = await self._start(stack)
            code = await tasks.wait()
            if code != EXIT_OK and tasks.reason:
                log.error("stopping with exit code %d: %s", code, tasks.reason)
            return code

    async def _start(self, stack: contextlib.AsyncExitStack) -> ServiceTasks:
        self._keep_files_until_stopped(stack)
        stack.push_async_callback(self.proxy_client.close)
        stack.push_async_callback(self.client.aclose)
        sock = stack.enter_context(contextlib.closing(listen(self.host, self.settings.server_port)))
        become_subreaper()  # orphaned backend helpers come to us, as to PID 1, and are reaped
        self.tasks = tasks = ServiceTasks()
        stack.push_async_callback(tasks.cancel)  # whatever still runs (backend watch, port)
        self._take_signals()
        self._serve_public_port(stack, sock)
        log.info("public port %s:%d; starting %s with profile %s", self.host,
                 self.settings.server_port, self.plan.backend.name, self.plan.profile.name)
        stack.push_async_callback(self._stop_backend)
        await self.process.start()
        if self.reconciler is not None:
            stack.push_async_callback(self.reconciler.close)
        tasks.loop("reaper", self._reap)
        stack.push_async_callback(tasks.cancel, "reaper")
        tasks.vital("backend", self._watch_backend())
        tasks.vital("start-up", self._start_up())
        stack.push_async_callback(tasks.cancel, ADAPTER_LOOP, HEALTH_LOOP, "start-up")
        return tasks

    def _keep_files_until_stopped(self, stack: contextlib.AsyncExitStack) -> None:
        """The snapshots and s3:// downloads (both per instance) go once nothing serves them."""
        if isinstance(self.settings.peft_source, S3Url):
            stack.push_async_callback(asyncio.to_thread, shutil.rmtree,
                                      downloads_folder(self.settings), True)
        if self.snapshots is not None:
            stack.push_async_callback(asyncio.to_thread, self.snapshots.remove_all)

    def _take_signals(self) -> None:
        """SIGTERM and SIGINT stop the service. The handlers stay until the loop closes, so a
        second signal during the stop changes nothing."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _serve_public_port(self, stack: contextlib.AsyncExitStack, sock: socket.socket) -> None:
        assert self.tasks is not None
        tasks = self.tasks
        server = GatewayServer(uvicorn.Config(build_app(self.gateway), **GATEWAY_SERVER_OPTIONS))
        tasks.vital("public port", server.serve(sockets=[sock]))

        async def close() -> None:
            server.should_exit = True  # finish the answers in flight, then close
            await tasks.finish("public port", timeout=PUBLIC_PORT_DRAIN_SECS)

        stack.push_async_callback(close)

    async def _stop_backend(self) -> None:
        """SIGTERM the backend, then SIGKILL its process group; reap whatever it left."""
        await self.process.stop()
        reap_orphans(set())

    def _on_signal(self, sig: int) -> None:
        assert self.tasks is not None
        if not self.tasks.stopping:
            log.info("received %s: stopping", signal.Signals(sig).name)
        self.tasks.stop(EXIT_OK)

    # ---- the long-lived tasks ----

    async def _start_up(self) -> None:
        """Wait for the backend, load the adapters, then run the adapter and health loops."""
        assert self.tasks is not None
        started = loop_time()
        if not await self.process.wait_ready(self.client, self.plan.backend.readiness_path):
            await asyncio.Event().wait()  # it exited: `_watch_backend` says so
        self.gateway.backend_up = self.backend_healthy = True
        log.info("%s ready in %.1f s", self.plan.backend.name, loop_time() - started)
        self.tasks.loop(HEALTH_LOOP, self._watch_health)
        await self._first_sync()
        self.adapters_synced = True
        if self.watcher is not None:
            self.tasks.loop(ADAPTER_LOOP, self.watcher.run)
        log.info("ready: serving %s with %d adapters on port %d", self.settings.served_name,
                 len(self.registry.ready_names()), self.settings.server_port)
        if self.on_ready is not None:
            self.on_ready()
        await asyncio.Event().wait()  # the loops run on; this task ends when the service does

    async def _watch_backend(self) -> None:
        """Stop the service when the backend exits on its own."""
        assert self.tasks is not None
        code = await self.process.wait()
        if not self.tasks.stopping:
            last = " | ".join(line for line in list(self.process.tail)[-5:] if line.strip())
            log.error("%s exited with code %s before it was asked to stop; last output: %s",
                      self.plan.backend.name, code, last or "(none)")
            self.tasks.stop(EXIT_BACKEND_DIED)

    async def _watch_health(self) -> None:
        """Poll the backend's health route; stop a backend that stops answering it."""
        assert self.tasks is not None
        bound = self.settings.backend_health_timeout_secs
        name, path = self.plan.backend.name, self.plan.backend.readiness_path
        last_answer = loop_time()
        while True:
            await asyncio.sleep(min(HEALTH_PROBE_SECS, bound / 3))
            problem = await self._probe(path, timeout=min(HEALTH_PROBE_TIMEOUT_SECS, bound / 2))
            if problem is None:
                if not self.backend_healthy:
                    log.info("%s answers its health check again", name)
                self.backend_healthy = True
                last_answer = loop_time()
                continue
            if self.backend_healthy:
                log.warning("%s does not answer %s (%s); not ready until it does",
                            name, path, problem)
            self.backend_healthy = False
            silent = loop_time() - last_answer
            if silent >= bound:
                log.error("%s has not answered %s for %.0f s (NIM_BACKEND_HEALTH_TIMEOUT_SECS="
                          "%g); stopping it", name, path, silent, bound)
                self.tasks.stop(EXIT_BACKEND_DIED, "the backend stopped answering")
                return

    async def _probe(self, path: str, *, timeout: float) -> str | None:
        """None when `path` answers 200 in time; else what went wrong."""
        try:
            response = await self.client.get(path, timeout=timeout)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if response.status_code == 200 else f"HTTP {response.status_code}"

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            keep = {self.process.pid} if self.process.pid else set()
            for pid in reap_orphans(keep):
                log.debug("reaped orphaned process %d", pid)

    async def _first_sync(self) -> None:
        if self.reconciler is not None:
            try:
                await self.reconciler.sync()
                await self.reconciler.wait_idle()
            except Exception:  # the adapter loop looks again; the base model serves meanwhile
                log.exception("the first pass over %s failed; the adapter loop retries it",
                              self.settings.peft_source)
            return
        # Static mode: the backend loaded the valid adapters at start.
        show_static(self.startup, self.registry)
        if self.settings.peft_source is not None:
            log.info("static mode: NIM_PEFT_REFRESH_INTERVAL is unset, so changes to %s are "
                     "ignored until a restart", self.settings.peft_source)


def metadata(startup: Startup) -> dict:
    """What `/v1/metadata` reports: the model, the selected profile, the backend, versions."""
    settings, plan = startup.settings, startup.plan
    profile, backend = plan.profile, plan.backend
    return {
        "version": __version__,
        "modelInfo": [{"shortName": settings.served_name, "modelUrl": settings.model_name}],
        "selectedModelProfileId": profile.id,
        "profile": {"id": profile.id, "name": profile.name, "precision": profile.precision,
                    "tp": profile.tp, "pp": profile.pp, "lora": profile.lora},
        "backend": {"name": backend.name, "version": backend.version()},
        "lora": {"source": str(settings.peft_source or "") or None,
                 "dynamic": settings.dynamic,
                 "max_lora_rank": plan.rank_limit.value},
    }


def adapter_api(settings: Settings, registry: Registry,
                reconciler: Reconciler | None) -> AdapterAPI:
    """The runtime API: on in dynamic mode unless NIM_PEFT_API_ENABLED=false."""
    return AdapterAPI(
        registry=registry, served_name=settings.served_name,
        source=source_folder(settings),
        reconciler=reconciler if settings.api_enabled else None,
        # a load may wait for requests to drain, then for a swap: an unload, a load and
        # a load back, the first two perhaps watched landing late
        timeout=DRAIN_SECS + 3 * settings.peft_api_timeout_secs + 2 * LATE_SWAP_WATCH_SECS,
        max_adapters=settings.peft_api_max_adapters,
        off="NIM_PEFT_API_ENABLED=false" if settings.dynamic else
        "static mode (set NIM_PEFT_REFRESH_INTERVAL to manage adapters at runtime)")


def show_static(startup: Startup, registry: Registry) -> None:
    """What a static server serves, through the states' own transitions: each adapter found at
    start, ready, or failed with why (a failed one is logged)."""
    served = dict(startup.plan.static_paths)
    for folder in startup.adapters:
        state = registry.track(folder.name)
        state.loading(folder)
        if folder.valid and folder.name in served:
            state.loaded(served[folder.name], folder.fingerprint)
            continue
        reason = folder.problem or startup.skipped.get(folder.name, "not loaded")
        state.refused_by_backend(folder, reason)  # (never looked at again: static)
        log.warning("adapter %s: skipped: %s (%s)", folder.name, reason, folder.location)


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def serve(
    settings: Settings,
    *,
    host: str = "0.0.0.0",
    backend_port: int | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Resolve, then run until a signal or the backend's death. Returns the exit code."""
    snapshots = snapshot_store(settings)
    private = private_folder()
    try:
        startup = resolve(settings, backend_port=backend_port, snapshots=snapshots,
                          private=private)

        async def main() -> int:
            return await Service(startup, host=host, on_ready=on_ready,
                                 snapshots=snapshots).run()

        return run_event_loop(main())
    finally:
        shutil.rmtree(private, ignore_errors=True)


__all__ = ["serve", "Service", "ADAPTER_LOOP", "EXIT_OK", "EXIT_BACKEND_DIED"]
