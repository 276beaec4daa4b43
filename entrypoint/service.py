"""Service: wires settings, profile, launch plan, supervisor, reconciler, watcher and gateway.

One asyncio loop runs everything. Owns the signals (SIGTERM/SIGINT stop the backend gracefully and
exit 0) and the exit code (non-zero when the backend dies). Holds no backend knowledge itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import httpx
import uvicorn

from . import __version__
from .adapters import AdapterFolder, scan_source
from .gateway import GatewayState, build_app
from .hardware import detect_gpus
from .launch import LaunchPlan, build_launch_plan
from .metrics import Metrics
from .profiles import load_profiles, model_parameters, select_profile
from .reconcile import Reconciler
from .registry import AdapterRecord, Registry, State
from .settings import ConfigError, Settings
from .snapshots import SnapshotChanged, SnapshotStore
from .supervisor import BackendProcess, become_subreaper, reap_orphans
from .upstream import Upstream
from .watcher import FolderWatcher

log = logging.getLogger("entrypoint")

EXIT_OK = 0
EXIT_BACKEND_DIED = 1


@dataclass(frozen=True)
class Startup:
    """Everything resolved before anything starts (what `serve --dry-run` prints)."""

    settings: Settings
    plan: LaunchPlan
    adapters: list[AdapterFolder]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def resolve(
    settings: Settings,
    *,
    backend_port: int | None = None,
    snapshots: SnapshotStore | None = None,
    dry_run: bool = False,
) -> Startup:
    """Settings -> profile -> adapters at start -> launch plan. Raises `ConfigError`.

    With `snapshots`, static adapters are served from snapshots taken now (a dry run takes none).
    """
    profiles = load_profiles(*([settings.profiles_path] if settings.profiles_path else []))
    profile, notes = select_profile(
        profiles,
        detect_gpus(),
        wanted=settings.model_profile,
        lora=settings.peft_source is not None,
        params=model_parameters(settings.model_name),
        allow_incompatible=dry_run,
    )
    adapters: list[AdapterFolder] = []
    if settings.peft_source is not None:
        adapters = scan_source(
            settings.peft_source, max_rank=settings.max_lora_rank,
            served_name=settings.served_name,
        )
    port = backend_port or free_port()
    plan = build_launch_plan(settings, profile, adapters, port=port)
    # The derived rank covers every adapter found, up to the most the backend allows; mark the
    # few above that (no second scan).
    limit = plan.max_lora_rank
    adapters = [
        replace(a, problem=f"rank {a.rank} is above the largest rank {profile.backend} allows "
                f"({limit})") if a.problem is None and (a.rank or 0) > limit else a
        for a in adapters
    ]
    if snapshots is not None and plan.static_adapters:
        paths = {}
        for folder in plan.static_adapters:
            try:
                paths[folder.name] = snapshots.take(folder)
            except (SnapshotChanged, OSError) as exc:
                log.warning("adapter %s: skipped: changed while starting (%s)", folder.name, exc)
        adapters = [a for a in adapters if a.name in paths or not a.valid]
        plan = build_launch_plan(settings, profile, [a for a in adapters if a.name in paths],
                                 port=port, load_paths=paths)
    for level, note in notes:
        log.log(level, note)
    log.info("selected profile %s (%s): %s", profile.name, profile.id, profile.backend)
    return Startup(settings=settings, plan=plan, adapters=adapters)


def snapshot_store(settings: Settings) -> SnapshotStore:
    """This instance's snapshot folder: one per host and public port, emptied at start."""
    instance = f"{socket.gethostname()}-{settings.server_port}"
    store = SnapshotStore(settings.cache_path.expanduser().resolve() / "snapshots" / instance)
    store.collect(keep=set())
    return store


def listen(host: str, port: int) -> socket.socket:
    """The public socket, bound before the backend starts so a busy port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it a response written as headers, then body,
    # waits for the client's delayed ACK (40 ms per request on keep-alive connections).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"NIM_SERVER_PORT={port}: cannot listen on {host}:{port} ({exc.strerror}); "
            "choose a free port"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


#: how the public port's server runs (the gateway benchmark uses the same)
GATEWAY_SERVER_OPTIONS = {"log_config": None, "access_log": False, "lifespan": "off",
                          "timeout_graceful_shutdown": 5}


def proxy_client(base_url: str) -> Upstream:
    """The gateway's client to the backend: pooled keep-alive connections, long reads."""
    return Upstream(base_url, read_timeout=600.0, connect_timeout=5.0)


class _GatewayServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self.settings = startup.settings
        self.plan = startup.plan
        self.host = host
        self.registry = Registry()
        self.metrics = Metrics(self.registry)
        self.stopping = asyncio.Event()
        self.process = BackendProcess(
            self.plan.argv, self.plan.env, label=self.plan.backend.name,
            raw_logs=not self.settings.jsonl_logging,
        )
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.plan.port}",
            timeout=httpx.Timeout(self.settings.peft_api_timeout_secs, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.proxy_client = proxy_client(f"http://127.0.0.1:{self.plan.port}")
        self.gateway = GatewayState(
            served_name=self.settings.served_name,
            backend=self.plan.backend,
            registry=self.registry,
            client=self.proxy_client,
            static_mode=not self.settings.dynamic,
            metadata=self.describe(),
            metrics=self.metrics,
        )
        self.snapshots = snapshots
        self.reconciler: Reconciler | None = None
        self.watcher: FolderWatcher | None = None
        source, interval = self.settings.peft_source, self.settings.peft_refresh_interval
        if source is not None and interval is not None:
            self.reconciler = Reconciler(
                backend=self.plan.backend,
                client=self.client,
                registry=self.registry,
                source=source,
                served_name=self.settings.served_name,
                max_rank=self.plan.max_lora_rank,
                snapshots=snapshots,
                traffic=self.gateway.traffic,
                metrics=self.metrics,
                wake=lambda: self.watcher and self.watcher.poke(),
            )
            self.watcher = FolderWatcher(source, interval=interval, look=self.reconciler.sync,
                                         events=self.settings.peft_watch_events)

    def describe(self) -> dict:
        """What `/v1/metadata` reports: the model, the selected profile, the backend, versions."""
        profile, backend = self.plan.profile, self.plan.backend
        return {
            "version": __version__,
            "modelInfo": [{"shortName": self.settings.served_name,
                           "modelUrl": self.settings.model_name}],
            "selectedModelProfileId": profile.id,
            "profile": {"id": profile.id, "name": profile.name, "precision": profile.precision,
                        "tp": profile.tp, "pp": profile.pp, "lora": profile.lora},
            "backend": {"name": backend.name, "version": backend.version()},
            "lora": {"source": str(self.settings.peft_source or "") or None,
                     "dynamic": self.settings.dynamic,
                     "max_lora_rank": self.plan.max_lora_rank},
        }

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        become_subreaper()  # orphaned backend helpers come to us, as to PID 1, and are reaped
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        sock = listen(self.host, self.settings.server_port)
        config = uvicorn.Config(build_app(self.gateway), **GATEWAY_SERVER_OPTIONS)
        server = _GatewayServer(config)
        gateway_task = asyncio.create_task(server.serve(sockets=[sock]))
        log.info("public port %s:%d; starting %s with profile %s", self.host,
                 self.settings.server_port, self.plan.backend.name, self.plan.profile.name)
        reaper = asyncio.create_task(self._reap())
        try:
            return await self._run_backend()
        finally:
            reaper.cancel()
            server.should_exit = True
            if self.reconciler is not None:
                await self.reconciler.close()
            await self.process.stop()
            reap_orphans(set())
            await asyncio.wait({gateway_task}, timeout=10)
            await self.client.aclose()
            await self.proxy_client.close()
            sock.close()
            if self.snapshots is not None:  # nothing serves them any more
                await asyncio.to_thread(self.snapshots.remove_all)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            keep = {self.process.pid} if self.process.pid else set()
            for pid in reap_orphans(keep):
                log.debug("reaped orphaned process %d", pid)

    def _on_signal(self, sig: int) -> None:
        if not self.stopping.is_set():
            log.info("received %s: stopping", signal.Signals(sig).name)
        self.stopping.set()

    async def _run_backend(self) -> int:
        await self.process.start()
        exited = asyncio.create_task(self.process.wait())
        stop = asyncio.create_task(self.stopping.wait())
        started = loop_time()
        ready = asyncio.create_task(
            self.process.wait_ready(self.client, self.plan.backend.readiness_path)
        )
        await asyncio.wait({ready, stop}, return_when=asyncio.FIRST_COMPLETED)
        if self.stopping.is_set():
            ready.cancel()
            return EXIT_OK
        if not ready.result():
            return self._backend_died(await exited)
        self.gateway.backend_up = True
        log.info("%s ready in %.1f s", self.plan.backend.name, loop_time() - started)
        await self._first_sync()
        self.gateway.ready = True
        log.info("ready: serving %s with %d adapters on port %d", self.settings.served_name,
                 len(self.registry.ready_names()), self.settings.server_port)
        if self.on_ready is not None:
            self.on_ready()
        watcher = asyncio.create_task(self.watcher.run()) if self.watcher else None
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        self.gateway.ready = False
        if watcher is not None:
            watcher.cancel()
        if self.stopping.is_set():
            return EXIT_OK
        return self._backend_died(exited.result())

    def _backend_died(self, code: int) -> int:
        last = " | ".join(line for line in list(self.process.tail)[-5:] if line.strip())
        log.error("%s exited with code %s before it was asked to stop; last output: %s",
                  self.plan.backend.name, code, last or "(none)")
        return EXIT_BACKEND_DIED

    async def _first_sync(self) -> None:
        if self.reconciler is not None:
            await self.reconciler.sync()
            await self.reconciler.wait_idle()
            return
        # Static mode: the backend loaded the valid adapters at start.
        served = dict(self.plan.static_paths)
        for folder in self.startup.adapters:
            if folder.valid and folder.name in served:
                record = AdapterRecord(name=folder.name, state=State.READY, source=folder.path,
                                       loaded_path=served[folder.name], version=folder.fingerprint,
                                       loaded_version=folder.fingerprint, rank=folder.rank,
                                       size=folder.size)
            else:
                record = AdapterRecord(name=folder.name, state=State.FAILED, source=folder.path,
                                       version=folder.fingerprint, rank=folder.rank,
                                       size=folder.size, reason=folder.problem or "not loaded")
                log.warning("adapter %s: skipped: %s (%s)", folder.name, record.reason,
                            folder.path)
            self.registry.put(record)
        if self.settings.peft_source is not None:
            log.info("static mode: NIM_PEFT_REFRESH_INTERVAL is unset, so changes to %s are "
                     "ignored until a restart", self.settings.peft_source)

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
    startup = resolve(settings, backend_port=backend_port, snapshots=snapshots)

    async def main() -> int:
        return await Service(startup, host=host, on_ready=on_ready, snapshots=snapshots).run()

    return asyncio.run(main())


__all__ = ["serve", "resolve", "Service", "Startup"]
