"""Service: wires settings, profile, launch plan, supervisor, reconciler, watcher and gateway.

One asyncio loop runs everything. Owns the signals (SIGTERM/SIGINT stop the backend gracefully and
exit 0) and the exit code (non-zero when the backend dies). Holds no backend knowledge itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import uvicorn

from entrypoint import __version__
from entrypoint.adapters.files import Kind
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import outside_roots
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends import Backend
from entrypoint.config.hardware import detect_gpus
from entrypoint.config.profiles import Profile, load_profiles, model_parameters, select_profile
from entrypoint.config.settings import ConfigError, Settings
from entrypoint.gateway.api import AdapterAPI
from entrypoint.gateway.app import build_app
from entrypoint.gateway.http import HeaderDeadlineProtocol
from entrypoint.gateway.state import GatewayState
from entrypoint.gateway.upstream import Upstream
from entrypoint.metrics import LoraRequestsInfo, Metrics
from entrypoint.reconcile.calls import DRAIN_SECS, LATE_SWAP_WATCH_SECS
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import AdapterRecord, Registry, State, Traffic
from entrypoint.runtime.launch import LaunchPlan, build_launch_plan, plan_backend, rank_limit
from entrypoint.runtime.supervisor import BackendProcess, become_subreaper, reap_orphans
from entrypoint.runtime.tasks import ServiceTasks
from entrypoint.runtime.watcher import FolderWatcher
from entrypoint.snapshots import SnapshotChanged, SnapshotFailed, SnapshotRefused, SnapshotStore
from entrypoint.sources.base import AdapterSource
from entrypoint.sources.intent import Intent
from entrypoint.sources.s3 import SETTLE_SECS, source_for
from entrypoint.sources.s3_client import S3Error, S3Url

log = logging.getLogger("entrypoint")

EXIT_OK = 0
EXIT_BACKEND_DIED = 1
ADAPTER_LOOP = "adapter loop"
HEALTH_LOOP = "backend health check"
HEALTH_PROBE_SECS = 2.0
HEALTH_PROBE_TIMEOUT_SECS = 10.0


@dataclass(frozen=True)
class Startup:
    """Everything resolved before anything starts (what `serve --dry-run` prints):
    settings -> profile -> adapters found -> rank limit -> snapshots -> launch plan."""

    settings: Settings
    plan: LaunchPlan
    #: every folder found at start, judged against the rank limit
    adapters: tuple[AdapterFolder, ...]
    #: static adapters that could not be served, and why (their snapshot failed)
    skipped: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: what runtime API calls asked for before this start, read once (the reconciler's to
    #: change from here on); None when the API is off
    intent: Intent | None = None

    @property
    def rank_limit(self) -> RankLimit:
        return self.plan.rank_limit


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def choose_profile(
    settings: Settings, *, dry_run: bool = False
) -> tuple[Profile, list[tuple[int, str]]]:
    """The profile to serve with, and what to tell the operator about the choice (logged only
    once the whole start-up resolved, so that an error is the only line a failed start prints).
    Raises `ConfigError`."""
    profiles = load_profiles(*([settings.profiles_path] if settings.profiles_path else []))
    return select_profile(
        profiles,
        detect_gpus(),
        wanted=settings.model_profile,
        lora=settings.peft_source is not None,
        params=model_parameters(settings.model_name),
        allow_incompatible=dry_run,
    )


def intent_file(settings: Settings) -> Path:
    """Where the runtime API's loads and unloads are kept: one file per served model name
    (a restart on another port or host keeps them; two models can share one cache)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", settings.served_name).lstrip(".") or "model"
    return settings.cache_path.expanduser().resolve() / "adapter-api" / f"{name}.json"


def kept_intent(settings: Settings) -> Intent | None:
    """The runtime API's decisions kept from earlier runs (None when the API is off)."""
    return Intent.read(intent_file(settings)) if settings.api_enabled else None


def instance_name(settings: Settings) -> str:
    """This server among those sharing NIM_CACHE_PATH: its host and public port. Its snapshots
    and downloads live under this name, so two servers never delete each other's."""
    return f"{socket.gethostname()}-{settings.server_port}"


def downloads_folder(settings: Settings) -> Path:
    """Where adapters from an s3:// source are downloaded (one folder per instance)."""
    return settings.cache_path.expanduser().resolve() / "s3" / instance_name(settings)


def source_scanner_for(settings: Settings, downloads: Path,
                       limit: RankLimit | None = None) -> AdapterSource:
    """The scanner of NIM_PEFT_SOURCE (a folder or an s3:// prefix). Raises `ConfigError`."""
    assert settings.peft_source is not None
    try:
        return source_for(settings.peft_source, downloads=downloads, limit=limit,
                          served_name=settings.served_name,
                          settle=settings.peft_refresh_interval or SETTLE_SECS)
    except S3Error as exc:
        raise ConfigError(f"NIM_PEFT_SOURCE={settings.peft_source}: {exc}") from None


def scan_adapters(settings: Settings, downloads: Path, *, serving: bool = False
                  ) -> list[AdapterFolder]:
    """The adapters in NIM_PEFT_SOURCE now (no rank limit applied).

    An s3:// source that cannot be listed is an error (`ConfigError`, one line), except for a
    dynamic server (`serving` with NIM_PEFT_REFRESH_INTERVAL set) whose credentials and bucket
    are right: its adapter loop keeps trying, so it starts without those adapters. A static
    server, `check-adapters` and `--dry-run` would never look again (and must not report an
    unreachable store as an empty one); neither may a static server start without an adapter
    whose download failed.
    """
    if settings.peft_source is None:
        return []
    scanner = source_scanner_for(settings, downloads)
    try:
        found = scanner.scan_at_start()
    finally:
        scanner.close()  # (downloads still running stop; the adapter loop has its own)
    problem = scanner.source_problem
    keeps_trying = serving and settings.dynamic
    if problem is not None and (scanner.fatal or not keeps_trying):
        raise ConfigError(f"NIM_PEFT_SOURCE={settings.peft_source}: {problem}")
    if problem is not None:
        log.error("NIM_PEFT_SOURCE=%s: %s; starting without its adapters and %s%s",
                  settings.peft_source, problem, scanner.retry_hint,
                  "" if settings.max_lora_rank else "; the rank limit is derived from no "
                  "adapters: set NIM_MAX_LORA_RANK to serve larger ranks when the store is back")
    failed = [f for f in found if f.pending and f.kind is Kind.DOWNLOAD_FAILED]
    if failed and serving and not settings.dynamic:
        raise ConfigError(f"NIM_PEFT_SOURCE={settings.peft_source}: adapter {failed[0].name} "
                          f"could not be downloaded ({failed[0].problem}); a static server "
                          "would never try again: restart when the store answers")
    return found


def judge_adapters(
    settings: Settings, backend: Backend, intent: Intent | None = None, *,
    downloads: Path | None = None, serving: bool = False,
) -> tuple[tuple[AdapterFolder, ...], RankLimit]:
    """The adapters in NIM_PEFT_SOURCE now, and the rank limit they give (NIM_MAX_LORA_RANK,
    or derived from them and from the adapters kept from runtime API loads), each judged
    against it. `serve` and `check-adapters` both use this, so they agree on every adapter.
    Adapters from an s3:// source are downloaded under `downloads` (default: this instance's
    folder under NIM_CACHE_PATH). `serving`: for `serve` itself (see `scan_adapters`)."""
    found = scan_adapters(settings, downloads or downloads_folder(settings), serving=serving)
    kept = [] if intent is None else [
        inspect_folder(path, name=name) for name, path in intent.loaded.items()
        if outside_roots(str(path), settings.api_roots) is None]
    limit = rank_limit(settings, backend, [*found, *kept])
    return tuple(limit.apply(folder) for folder in found), limit


def resolve(
    settings: Settings,
    *,
    backend_port: int | None = None,
    snapshots: SnapshotStore | None = None,
    dry_run: bool = False,
    downloads: Path | None = None,
    private: Path | None = None,
) -> Startup:
    """Settings -> profile -> adapters -> rank limit -> snapshots -> launch plan, each once.
    Raises `ConfigError`.

    With `snapshots`, static adapters are served from snapshots taken now (a dry run takes none).
    Adapters from an s3:// source are downloaded under `downloads` (default: this instance's
    folder under NIM_CACHE_PATH). A backend that can listens on a Unix socket in `private` (a
    folder only this user may enter: `private_folder`); another gets a key made now.
    """
    profile, notes = choose_profile(settings, dry_run=dry_run)
    backend = plan_backend(settings, profile)
    intent = kept_intent(settings)
    adapters, limit = judge_adapters(settings, backend, intent, downloads=downloads,
                                     serving=not dry_run)
    skipped: dict[str, str] = {}
    paths: dict[str, Path] = {}
    if snapshots is not None and not settings.dynamic:
        for folder in adapters:
            if not folder.valid:
                continue
            try:
                paths[folder.name] = snapshots.take(folder, roots=(
                    Path(os.path.realpath(folder.path.parent)),))
            except SnapshotRefused as exc:
                skipped[folder.name] = str(exc)
            except SnapshotChanged as exc:
                skipped[folder.name] = (f"its files changed while starting ({exc}); restart "
                                        "to serve it")
            except SnapshotFailed as exc:
                skipped[folder.name] = str(exc)
    served = [a for a in adapters if a.name not in skipped]
    uds = (private or Path(tempfile.gettempdir(), "lora-entrypoint-XXXXXXXX")) / \
        f"{backend.name}.sock"
    plan = build_launch_plan(settings, profile, served, limit=limit,
                             port=backend_port or free_port(), load_paths=paths,
                             uds=str(uds), internal_key=secrets.token_urlsafe(24))
    for level, note in notes:
        log.log(level, note)
    log.info("selected profile %s (%s): %s; rank limit %s", profile.name, profile.id,
             profile.backend, limit.describe())
    return Startup(settings=settings, plan=plan, adapters=adapters,
                   skipped=MappingProxyType(skipped), intent=intent)


def snapshot_store(settings: Settings) -> SnapshotStore:
    """This instance's snapshot folder: one per host and public port, emptied at start."""
    store = SnapshotStore(settings.cache_path.expanduser().resolve() / "snapshots"
                          / instance_name(settings),
                          grace=settings.snapshot_grace_secs)
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
GATEWAY_SERVER_OPTIONS: dict[str, Any] = {
    "log_config": None, "access_log": False, "lifespan": "off", "timeout_graceful_shutdown": 5,
    "http": HeaderDeadlineProtocol, "interface": "asgi3"}


def private_folder() -> Path:
    """A new folder only this user may enter (mode 0700), for the backend's socket."""
    return Path(tempfile.mkdtemp(prefix="lora-entrypoint-"))


def proxy_client(base_url: str, *, headers: dict[str, str] | None = None,
                 uds: str | None = None) -> Upstream:
    """The gateway's client to the backend: pooled keep-alive connections, long reads."""
    return Upstream(base_url, read_timeout=600.0, connect_timeout=5.0, headers=headers, uds=uds)


def admin_client(plan: LaunchPlan, timeout: float) -> httpx.AsyncClient:
    """The entrypoint's own client to the backend (probes, lists, loads, unloads)."""
    return httpx.AsyncClient(
        base_url=plan.backend_url, headers=backend_headers(plan),
        transport=httpx.AsyncHTTPTransport(uds=plan.uds) if plan.uds else None,
        timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


def backend_headers(plan: LaunchPlan) -> dict[str, str]:
    """Headers for every call to the backend: its key, when it requires one."""
    return {"Authorization": f"Bearer {plan.backend_key}"} if plan.backend_key else {}


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
        self.traffic = Traffic()
        lora_info = None if self.plan.backend.reports_lora_requests else LoraRequestsInfo(
            self.traffic, self.settings.max_gpu_loras)
        self.metrics = Metrics(self.registry, lora_info=lora_info)
        self.tasks: ServiceTasks | None = None
        self.process = BackendProcess(
            self.plan.argv, self.plan.env, label=self.plan.backend.name,
            raw_logs=not self.settings.jsonl_logging, shown_argv=self.plan.shown_argv,
        )
        self.client = admin_client(self.plan, self.settings.peft_api_timeout_secs)
        self.proxy_client = proxy_client(self.plan.backend_url, uds=self.plan.uds,
                                         headers=backend_headers(self.plan))
        self.gateway = GatewayState(
            served_name=self.settings.served_name,
            backend=self.plan.backend,
            registry=self.registry,
            client=self.proxy_client,
            readiness=self.not_ready_because,
            static_mode=not self.settings.dynamic,
            metadata=self.describe(),
            metrics=self.metrics,
            api_keys=self.plan.api_keys,
            traffic=self.traffic,
        )
        self.snapshots = snapshots
        self.reconciler: Reconciler | None = None
        self.watcher: FolderWatcher | None = None
        self.adapters_synced = False  # the first pass over the adapter folder is done
        self.backend_healthy = False  # the backend's health route answered the last probe
        source, interval = self.settings.peft_source, self.settings.peft_refresh_interval
        if source is not None and interval is not None:
            scanner = source_scanner_for(self.settings, downloads_folder(self.settings),
                                         self.plan.rank_limit)
            self.reconciler = Reconciler(
                backend=self.plan.backend,
                client=self.client,
                registry=self.registry,
                served_name=self.settings.served_name,
                rank_limit=self.plan.rank_limit,
                scanner=scanner,
                snapshots=snapshots,
                traffic=self.traffic,
                metrics=self.metrics,
                wake=self._poke_watcher,
                intent=startup.intent,
                api_roots=self.settings.api_roots,
            )
            # (an object store sends no events here: it is listed every interval)
            self.watcher = FolderWatcher(source if isinstance(source, Path) else None,
                                         interval=interval, look=self.reconciler.sync,
                                         events=self.settings.peft_watch_events)
        self.gateway.api = AdapterAPI(
            registry=self.registry, served_name=self.settings.served_name,
            source=source if isinstance(source, Path) else None,
            reconciler=self.reconciler if self.settings.api_enabled else None,
            # a load may wait for requests to drain, then for a swap: an unload, a load and
            # a load back, the first two perhaps watched landing late
            timeout=DRAIN_SECS + 3 * self.settings.peft_api_timeout_secs
            + 2 * LATE_SWAP_WATCH_SECS,
            max_adapters=self.settings.peft_api_max_adapters,
            off="NIM_PEFT_API_ENABLED=false" if self.settings.dynamic else
            "static mode (set NIM_PEFT_REFRESH_INTERVAL to manage adapters at runtime)")

    def _poke_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.poke()

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
                     "max_lora_rank": self.plan.rank_limit.value},
        }

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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        become_subreaper()  # orphaned backend helpers come to us, as to PID 1, and are reaped
        self.tasks = tasks = ServiceTasks()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        sock = listen(self.host, self.settings.server_port)
        config = uvicorn.Config(build_app(self.gateway), **GATEWAY_SERVER_OPTIONS)
        server = _GatewayServer(config)
        tasks.vital("public port", server.serve(sockets=[sock]))
        tasks.loop("reaper", self._reap)
        log.info("public port %s:%d; starting %s with profile %s", self.host,
                 self.settings.server_port, self.plan.backend.name, self.plan.profile.name)
        try:
            await self.process.start()
            tasks.vital("backend", self._watch_backend())
            tasks.vital("start-up", self._start_up())
            code = await tasks.wait()
            if code != EXIT_OK and tasks.reason:
                log.error("stopping with exit code %d: %s", code, tasks.reason)
            return code
        finally:
            await tasks.cancel(ADAPTER_LOOP, HEALTH_LOOP, "start-up", "reaper")
            if self.reconciler is not None:
                await self.reconciler.close()
            await self.process.stop()
            reap_orphans(set())
            server.should_exit = True  # finish the answers in flight, then close
            await tasks.finish("public port", timeout=10)
            await tasks.cancel()
            await self.client.aclose()
            await self.proxy_client.close()
            sock.close()
            if self.snapshots is not None:  # nothing serves them any more
                await asyncio.to_thread(self.snapshots.remove_all)
            if isinstance(self.settings.peft_source, S3Url):  # (as the snapshots: per instance)
                await asyncio.to_thread(shutil.rmtree, downloads_folder(self.settings), True)

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
            self._backend_died(code)
            self.tasks.stop(EXIT_BACKEND_DIED)

    async def _watch_health(self) -> None:
        """Poll the backend's health route; stop a backend that stops answering it."""
        assert self.tasks is not None
        bound = self.settings.backend_health_timeout_secs
        path = self.plan.backend.readiness_path
        last_answer = loop_time()
        while True:
            await asyncio.sleep(min(HEALTH_PROBE_SECS, bound / 3))
            problem = await self._probe(path, timeout=min(HEALTH_PROBE_TIMEOUT_SECS, bound / 2))
            if problem is None:
                if not self.backend_healthy:
                    log.info("%s answers its health check again", self.plan.backend.name)
                self.backend_healthy = True
                last_answer = loop_time()
                continue
            if self.backend_healthy:
                log.warning("%s does not answer %s (%s); not ready until it does",
                            self.plan.backend.name, path, problem)
            self.backend_healthy = False
            silent = loop_time() - last_answer
            if silent >= bound:
                log.error("%s has not answered %s for %.0f s (NIM_BACKEND_HEALTH_TIMEOUT_SECS="
                          "%g); stopping it", self.plan.backend.name, path, silent, bound)
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

    def _on_signal(self, sig: int) -> None:
        assert self.tasks is not None
        if not self.tasks.stopping:
            log.info("received %s: stopping", signal.Signals(sig).name)
        self.tasks.stop(EXIT_OK)

    def _backend_died(self, code: int) -> None:
        last = " | ".join(line for line in list(self.process.tail)[-5:] if line.strip())
        log.error("%s exited with code %s before it was asked to stop; last output: %s",
                  self.plan.backend.name, code, last or "(none)")

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
        served = dict(self.plan.static_paths)
        for folder in self.startup.adapters:
            if folder.valid and folder.name in served:
                record = AdapterRecord(name=folder.name, state=State.READY, source=folder.path,
                                       loaded_path=served[folder.name], version=folder.fingerprint,
                                       loaded_version=folder.fingerprint, rank=folder.rank,
                                       size=folder.size, url=folder.url)
            else:
                reason = folder.problem or self.startup.skipped.get(folder.name, "not loaded")
                record = AdapterRecord(name=folder.name, state=State.FAILED, source=folder.path,
                                       version=folder.fingerprint, rank=folder.rank,
                                       size=folder.size, reason=reason, url=folder.url)
                log.warning("adapter %s: skipped: %s (%s)", folder.name, record.reason,
                            folder.location)
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


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop where it is installed (the public port's cost per request and per
    streamed chunk: benchmarks/gateway.py), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


__all__ = ["serve", "resolve", "Service", "Startup"]
