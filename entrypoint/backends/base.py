"""The one small interface every backend implements.

How to start it (argv and env), how to tell it is ready, how to load and unload an adapter and
read its answers, and how it names an adapter in a request. Backend-specific knowledge lives in
the modules beside this one and nowhere else.
"""

from __future__ import annotations

import enum
import importlib.metadata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx

if TYPE_CHECKING:
    from entrypoint.config.profiles import Profile
    from entrypoint.config.settings import Settings


class Outcome(enum.Enum):
    """What a load or unload call came to, in the backend-neutral terms the reconciler uses."""

    DONE = "done"  # loaded, or unloaded
    ALREADY_LOADED = "already_loaded"  # our record and the backend's disagree: reconcile
    GONE = "gone"  # unload of a name the backend does not know: already gone
    REFUSED = "refused"  # the backend will never take these files: failed until they change
    TRANSIENT = "transient"  # connection refused, timeout, 5xx while restarting: retry later


@dataclass(frozen=True)
class Reply:
    outcome: Outcome
    message: str = ""
    #: the call may have reached the engine but no answer came (a read timeout, a dropped
    #: connection): it may still act on it later. False for an answer, or a refused connection.
    unanswered: bool = False


@dataclass(frozen=True)
class StartSpec:
    """What the launch plan needs from the settings, resolved."""

    model: str
    served_name: str
    host: str
    port: int
    max_lora_rank: int
    tp: int  # NIM_TENSOR_PARALLEL_SIZE, else the profile's
    pp: int  # NIM_PIPELINE_PARALLEL_SIZE, else the profile's
    static_adapters: tuple[tuple[str, Path], ...]  # (name, path to load from)
    dynamic: bool
    #: target modules of each valid adapter present at start (SGLang derives its pool from them)
    adapter_modules: tuple[tuple[str, ...], ...] = ()
    #: listen on this Unix socket instead of `host`:`port` (engines with `unix_socket`)
    uds: str | None = None
    #: a key the engine must require of every caller but its health and metrics routes (made
    #: by the entrypoint for an engine on a TCP port when the user set none)
    api_key: str | None = field(default=None, repr=False)


class Backend(ABC):
    """A serving engine behind the entrypoint."""

    name: ClassVar[str]
    #: ranks the engine accepts for its max-LoRA-rank setting, ascending
    allowed_ranks: ClassVar[tuple[int, ...]]
    #: the largest max-LoRA-rank the engine accepts
    max_rank: ClassVar[int]
    #: GET this path on the backend until it answers 200
    readiness_path: ClassVar[str] = "/health"
    #: the engine's own Prometheus metrics, appended to `/v1/metrics`
    metrics_path: ClassVar[str] = "/metrics"
    #: the engine's metrics include vLLM's `vllm:lora_requests_info` (else the gateway makes it)
    reports_lora_requests: ClassVar[bool] = False
    #: Python distributions that provide the engine, in order of preference
    packages: ClassVar[tuple[str, ...]] = ()
    #: the engine can listen on a Unix socket (then nothing on the host but the entrypoint,
    #: and its own user, can reach it); else it listens on loopback and requires a key
    unix_socket: ClassVar[bool] = False

    @abstractmethod
    def argv(
        self, spec: StartSpec, *, settings: Settings, profile: Profile, python: str
    ) -> list[str]:
        """The command line that starts the engine (before passthrough arguments)."""

    @abstractmethod
    def env(self, spec: StartSpec, *, settings: Settings, profile: Profile) -> dict[str, str]:
        """Environment variables the engine needs on top of the entrypoint's own."""

    @abstractmethod
    async def load(self, client: httpx.AsyncClient, name: str, path: Path) -> Reply:
        """Load `path` under `name` (a name already loaded answers ALREADY_LOADED: a swap is
        an unload, then a load)."""

    @abstractmethod
    async def unload(self, client: httpx.AsyncClient, name: str) -> Reply:
        """Forget `name`."""

    async def loaded(self, client: httpx.AsyncClient) -> dict[str, str]:
        """The adapters the engine serves now: name -> the path it loaded them from.

        Both engines list adapters in `/v1/models` as cards whose `parent` is the base model.
        """
        response = await client.get("/v1/models")
        response.raise_for_status()
        cards = response.json().get("data", [])
        return {card["id"]: card.get("root", "") for card in cards if card.get("parent")}

    def request_model(self, served_name: str, adapter: str | None) -> str:
        """The `model` value the engine needs in an OpenAI request for this adapter (or base)."""
        return adapter or served_name

    def version(self) -> str | None:
        """The installed engine's version, or None when it is not installed here."""
        for package in self.packages:
            try:
                return importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def check_settings(self, settings: Settings) -> None:
        """Raise `ConfigError` for settings this engine cannot run with."""
        return None

    def api_keys(self, settings: Settings) -> tuple[str, ...]:
        """The keys the engine will require as `Authorization: Bearer <key>` (none: open)."""
        # (imported here, not at the top: vLLM's own processes import this package)
        from entrypoint.config.settings import passthrough_values
        return tuple(key for key in passthrough_values(settings, "--api-key") if key)

    def rank_limit(self, wanted: int) -> int | None:
        """The smallest allowed max-rank covering `wanted`, or None when none does."""
        return next((rank for rank in self.allowed_ranks if rank >= wanted), None)


def transient(exc: Exception) -> Reply:
    """A reply for an exception raised by the HTTP client (timeouts, refused connections)."""
    kind = type(exc).__name__
    never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    return Reply(Outcome.TRANSIENT, f"{kind}: {exc}" if str(exc) else kind,
                 unanswered=not never_sent)
