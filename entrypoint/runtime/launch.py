"""Launch plan: a pure function from (settings, profile, adapters found at start, rank limit)
to argv + env; and the rank limit itself, computed once.

Starts nothing and reads no files, so it is testable on its own and printable
(`serve --dry-run`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from entrypoint.adapters.folder import AdapterFolder
from entrypoint.adapters.rank import RankLimit
from entrypoint.backends import Backend, StartSpec, get_backend
from entrypoint.config.profiles import Profile
from entrypoint.config.settings import ConfigError, Settings

BACKEND_HOST = "127.0.0.1"
MIN_DERIVED_RANK = 16


@dataclass(frozen=True)
class LaunchPlan:
    """How to start the backend, and what it will serve at start."""

    profile: Profile
    backend: Backend
    argv: list[str]
    env: dict[str, str]
    port: int
    rank_limit: RankLimit
    static_adapters: tuple[AdapterFolder, ...] = field(default=())
    static_paths: tuple[tuple[str, Path], ...] = field(default=())  # name -> path it loads
    #: keys the user set (VLLM_API_KEY, --api-key): the public port requires them
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: the backend's Unix socket (None: it listens on 127.0.0.1:`port`)
    uds: str | None = None
    #: the key the entrypoint sends with every call to the backend (None: it wants none)
    backend_key: str | None = field(default=None, repr=False)

    @property
    def backend_url(self) -> str:
        """The backend's base URL (over `uds` when it listens on a socket)."""
        return "http://backend" if self.uds else f"http://{BACKEND_HOST}:{self.port}"

    @property
    def shown_argv(self) -> list[str]:
        """`argv` with secrets replaced, for logs and `--dry-run`."""
        return redact(self.argv)

    def describe(self) -> dict:
        return {
            "profile": {"name": self.profile.name, "id": self.profile.id},
            "backend": self.backend.name,
            "argv": self.shown_argv,
            "env": self.env,
            "max_lora_rank": self.rank_limit.value,
            "rank_limit": self.rank_limit.describe(),
            "static_adapters": [a.name for a in self.static_adapters],
        }


SECRET_OPTIONS = ("--api-key",)


def redact(argv: list[str]) -> list[str]:
    """`argv` with the values of secret options (`--api-key K`, `--api-key=K`) shown as ***."""
    shown, hiding = [], False
    for arg in argv:
        if hiding and not (arg.startswith("-") and len(arg) > 1):
            shown.append("***")
            continue
        hiding = arg in SECRET_OPTIONS
        option = arg.split("=", 1)[0]
        shown.append(f"{option}=***" if "=" in arg and option in SECRET_OPTIONS else arg)
    return shown


def rank_limit(settings: Settings, backend: Backend, adapters: list[AdapterFolder]) -> RankLimit:
    """NIM_MAX_LORA_RANK, or the smallest rank the backend allows covering every valid adapter
    found (at least 16; at most the backend's largest)."""
    if settings.max_lora_rank is not None:
        return RankLimit(settings.max_lora_rank)
    ranks = [a.rank for a in adapters if a.rank is not None and a.valid]
    wanted = max([MIN_DERIVED_RANK, *ranks])
    return RankLimit(backend.rank_limit(wanted) or backend.max_rank, derived=True,
                     engine=backend.name, engine_max=backend.max_rank,
                     allowed=backend.allowed_ranks)


def plan_backend(settings: Settings, profile: Profile) -> Backend:
    """The profile's backend, after checking the settings it depends on. Raises `ConfigError`."""
    backend = get_backend(profile.backend)
    backend.check_settings(settings)
    if settings.peft_source is not None and not profile.lora:
        raise ConfigError(
            f"NIM_MODEL_PROFILE={profile.name} does not serve LoRA but NIM_PEFT_SOURCE is set; "
            "choose a profile whose name ends in feat_lora"
        )
    return backend


def build_launch_plan(
    settings: Settings,
    profile: Profile,
    adapters: list[AdapterFolder],
    *,
    backend: Backend,
    limit: RankLimit,
    port: int,
    python: str = sys.executable,
    load_paths: Mapping[str, Path] | None = None,
    uds: str | None = None,
    internal_key: str | None = None,
) -> LaunchPlan:
    """The backend's argv and env. Only valid adapters are ever passed at start (`adapters`
    are already judged against `limit`; `backend` is the profile's, as `plan_backend` gave it).

    `load_paths` maps static adapters to the snapshot they are served from (default: their
    folders, as `serve --dry-run` shows them). The backend is closed to everything but the
    entrypoint: an engine that can listens on `uds` (a socket in a private folder); another
    requires `internal_key` of every caller, unless the user set a key of their own.
    """
    user_keys = backend.api_keys(settings)
    socket = uds if backend.unix_socket else None
    key = None if socket or user_keys else internal_key
    static = tuple(a for a in adapters if a.valid)
    spec = StartSpec(
        model=settings.model_name or "",
        served_name=settings.served_name,
        host=BACKEND_HOST,
        port=port,
        max_lora_rank=limit.value,
        tp=settings.tensor_parallel_size or profile.tp,
        pp=settings.pipeline_parallel_size or profile.pp,
        static_adapters=() if settings.dynamic else tuple(
            (a.name, (load_paths or {}).get(a.name, a.path)) for a in static
        ),
        dynamic=settings.dynamic,
        adapter_modules=tuple(a.target_modules for a in static),
        uds=socket,
        api_key=key,
    )
    argv = backend.argv(spec, settings=settings, profile=profile, python=python)
    argv += settings.passthrough
    env = backend.env(spec, settings=settings, profile=profile)
    return LaunchPlan(
        profile=profile,
        backend=backend,
        argv=argv,
        env=env,
        port=port,
        rank_limit=limit,
        static_adapters=() if settings.dynamic else static,
        static_paths=spec.static_adapters,
        api_keys=user_keys,
        uds=socket,
        backend_key=key or (user_keys[0] if user_keys else None),
    )
