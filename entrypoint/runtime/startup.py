"""Start-up: settings -> `Startup`, everything decided before anything starts.

`resolve` runs the steps once each, in order: the profile, its backend, the runtime API's kept
intent, the scan of NIM_PEFT_SOURCE, the rank limit and the adapters judged against it, the
static adapters' snapshots, the launch plan. `serve --dry-run` prints what it returns and
`check-adapters` judges adapters with the same functions, so all three agree.

Starts no process and listens on no port. Its only writes are the ones it is handed the place for:
snapshots into the store it is given and an s3:// source's downloads into their folder.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from entrypoint.adapters.files import Kind
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import outside_roots
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends import Backend
from entrypoint.config.hardware import detect_gpus
from entrypoint.config.profiles import Profile, load_profiles, model_parameters, select_profile
from entrypoint.config.settings import ConfigError, Settings
from entrypoint.runtime.launch import LaunchPlan, build_launch_plan, plan_backend, rank_limit
from entrypoint.runtime.net import free_port
from entrypoint.snapshots import SnapshotChanged, SnapshotFailed, SnapshotRefused, SnapshotStore
from entrypoint.sources import source_for
from entrypoint.sources.base import AdapterSource
from entrypoint.sources.intent import Intent
from entrypoint.sources.s3 import SETTLE_SECS
from entrypoint.sources.s3_client import S3Error

log = logging.getLogger("entrypoint")


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


def resolve(
    settings: Settings,
    *,
    backend_port: int | None = None,
    snapshots: SnapshotStore | None = None,
    dry_run: bool = False,
    downloads: Path | None = None,
    private: Path | None = None,
) -> Startup:
    """Settings -> profile -> backend -> intent -> adapters -> rank limit -> snapshots ->
    launch plan, each once. Raises `ConfigError`.

    With `snapshots`, static adapters are served from snapshots taken now (a dry run takes none).
    Adapters from an s3:// source are downloaded under `downloads` (default: this instance's
    folder under NIM_CACHE_PATH). A backend that can listens on a Unix socket in `private` (a
    folder only this user may enter: `private_folder`); another gets a key made now.
    """
    profile, notes = choose_profile(settings, dry_run=dry_run)
    backend = plan_backend(settings, profile)
    intent = kept_intent(settings)
    found = scan_adapters(settings, downloads or downloads_folder(settings), serving=not dry_run)
    adapters, limit = judge(settings, backend, found, intent)
    paths, skipped = ({}, {}) if snapshots is None or settings.dynamic else \
        take_snapshots(snapshots, adapters)
    plan = build_launch_plan(
        settings, profile, [a for a in adapters if a.name not in skipped], backend=backend,
        limit=limit, port=backend_port or free_port(), load_paths=paths,
        uds=str(backend_socket(private, backend)), internal_key=internal_key())
    announce(profile, limit, notes)
    return Startup(settings=settings, plan=plan, adapters=adapters,
                   skipped=MappingProxyType(skipped), intent=intent)


# ---- the steps, in the order `resolve` runs them ----

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


def judge(settings: Settings, backend: Backend, found: Iterable[AdapterFolder],
          intent: Intent | None) -> tuple[tuple[AdapterFolder, ...], RankLimit]:
    """The rank limit `found` and the adapters kept from runtime API loads give (or
    NIM_MAX_LORA_RANK), and each adapter of `found` judged against it."""
    found = list(found)
    kept = [] if intent is None else [
        inspect_folder(path, name=name) for name, path in intent.loaded.items()
        if isinstance(path, Path) and outside_roots(str(path), settings.api_roots) is None]
    limit = rank_limit(settings, backend, [*found, *kept])
    return tuple(limit.apply(folder) for folder in found), limit


def internal_key() -> str:
    """The key the entrypoint gives a backend it starts (SGLang's --api-key): hex, so it never
    begins with '-', which the backend's argument parser took for an option (one in 64 of the
    url-safe keys did, and SGLang refused to start: found by the full test run)."""
    return secrets.token_hex(24)


def take_snapshots(snapshots: SnapshotStore, adapters: Iterable[AdapterFolder]
                   ) -> tuple[dict[str, Path], dict[str, str]]:
    """Snapshots of the valid static adapters: name -> the path served, and name -> why not."""
    paths: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for folder in adapters:
        if not folder.valid:
            continue
        try:
            paths[folder.name] = snapshots.take(folder, roots=(
                Path(os.path.realpath(folder.path.parent)),))
        except SnapshotRefused as exc:
            skipped[folder.name] = str(exc)
        except SnapshotChanged as exc:
            skipped[folder.name] = f"its files changed while starting ({exc}); restart to serve it"
        except SnapshotFailed as exc:
            skipped[folder.name] = str(exc)
    return paths, skipped


def backend_socket(private: Path | None, backend: Backend) -> Path:
    """The backend's Unix socket, in `private` (a placeholder folder when there is none)."""
    return (private or Path(tempfile.gettempdir(), "lora-entrypoint-XXXXXXXX")) / \
        f"{backend.name}.sock"


def announce(profile: Profile, limit: RankLimit, notes: Iterable[tuple[int, str]]) -> None:
    """Log the choice, once the whole start-up resolved."""
    for level, note in notes:
        log.log(level, note)
    log.info("selected profile %s (%s): %s; rank limit %s", profile.name, profile.id,
             profile.backend, limit.describe())


# ---- for `check-adapters`, and the places `serve` keeps its files ----

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
    return judge(settings, backend, found, intent)


def instance_name(settings: Settings) -> str:
    """This server among those sharing NIM_CACHE_PATH: its host and public port. Its snapshots
    and downloads live under this name, so two servers never delete each other's."""
    return f"{socket.gethostname()}-{settings.server_port}"


def downloads_folder(settings: Settings) -> Path:
    """Where adapters from an s3:// source are downloaded (one folder per instance)."""
    return settings.cache_path.expanduser().resolve() / "s3" / instance_name(settings)


def api_downloads_folder(settings: Settings) -> Path:
    """Where adapters the runtime API loads from an s3:// or hf:// URI are downloaded (kept
    across restarts, as the loads are)."""
    return settings.cache_path.expanduser().resolve() / "api-downloads" / instance_name(settings)


def snapshot_store(settings: Settings) -> SnapshotStore:
    """This instance's snapshot folder: one per host and public port, emptied at start."""
    store = SnapshotStore(settings.cache_path.expanduser().resolve() / "snapshots"
                          / instance_name(settings),
                          grace=settings.snapshot_grace_secs)
    store.collect(keep=set())
    return store


def private_folder() -> Path:
    """A new folder only this user may enter (mode 0700), for the backend's socket."""
    return Path(tempfile.mkdtemp(prefix="lora-entrypoint-"))


__all__ = ["Startup", "resolve", "choose_profile", "judge_adapters", "kept_intent",
           "snapshot_store", "private_folder", "downloads_folder", "source_scanner_for"]
