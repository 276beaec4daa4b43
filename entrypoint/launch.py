"""Launch plan: a pure function from (settings, profile, adapters found at start) to argv + env.

Starts nothing and reads no files, so it is testable on its own and printable
(`serve --dry-run`).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import AdapterFolder
from .backends import Backend, StartSpec, get_backend
from .profiles import Profile
from .settings import ConfigError, Settings

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
    max_lora_rank: int
    static_adapters: tuple[AdapterFolder, ...] = field(default=())
    static_paths: tuple[tuple[str, Path], ...] = field(default=())  # name -> path it loads
    #: keys the backend requires (VLLM_API_KEY, --api-key): the public port requires them too
    api_keys: tuple[str, ...] = field(default=(), repr=False)

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
            "max_lora_rank": self.max_lora_rank,
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


def resolve_max_rank(settings: Settings, backend: Backend, adapters: list[AdapterFolder]) -> int:
    """NIM_MAX_LORA_RANK, or the smallest rank the backend allows covering every adapter (>= 16)."""
    if settings.max_lora_rank is not None:
        return settings.max_lora_rank
    ranks = [a.rank for a in adapters if a.rank is not None and a.problem is None]
    wanted = max([MIN_DERIVED_RANK, *ranks])
    return backend.rank_limit(wanted) or backend.max_rank


def build_launch_plan(
    settings: Settings,
    profile: Profile,
    adapters: list[AdapterFolder],
    *,
    port: int,
    python: str = sys.executable,
    load_paths: Mapping[str, Path] | None = None,
) -> LaunchPlan:
    """The backend's argv and env. Only valid adapters are ever passed at start.

    `load_paths` maps static adapters to the snapshot they are served from (default: their
    folders, as `serve --dry-run` shows them).
    """
    backend = get_backend(profile.backend)
    backend.check_settings(settings)
    if settings.peft_source is not None and not profile.lora:
        raise ConfigError(
            f"NIM_MODEL_PROFILE={profile.name} does not serve LoRA but NIM_PEFT_SOURCE is set; "
            "choose a profile whose name ends in feat_lora"
        )
    max_rank = resolve_max_rank(settings, backend, adapters)
    static = tuple(a for a in adapters if a.valid and (a.rank or 0) <= max_rank)
    spec = StartSpec(
        model=settings.model_name or "",
        served_name=settings.served_name,
        host=BACKEND_HOST,
        port=port,
        max_lora_rank=max_rank,
        tp=settings.tensor_parallel_size or profile.tp,
        pp=settings.pipeline_parallel_size or profile.pp,
        static_adapters=() if settings.dynamic else tuple(
            (a.name, (load_paths or {}).get(a.name, a.path)) for a in static
        ),
        dynamic=settings.dynamic,
        adapter_modules=tuple(a.target_modules for a in static),
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
        max_lora_rank=max_rank,
        static_adapters=() if settings.dynamic else static,
        static_paths=spec.static_adapters,
        api_keys=backend.api_keys(settings),
    )
