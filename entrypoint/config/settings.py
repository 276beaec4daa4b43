"""Settings: every `NIM_*` variable, typed and validated once.

Nothing else in the entrypoint reads `os.environ` for configuration. A bad value becomes a
`ConfigError` whose message is one line naming the variable and saying what to do.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from entrypoint.adapters.uris import allowed_problem, is_remote, split_allowed
from entrypoint.sources.listfile import is_list_file
from entrypoint.sources.s3_client import INSTALL, SCHEME, S3Url

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
LOG_LEVELS = {"TRACE", "DEBUG", "INFO", "DEFAULT", "WARNING", "ERROR", "CRITICAL"}


class ConfigError(Exception):
    """A user error in the configuration: one line, naming the variable or folder."""


def env_name(field: str) -> str:
    """The environment variable behind a settings field (`peft_source` -> `NIM_PEFT_SOURCE`)."""
    return "NIM_" + field.upper()


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError("expected one of true/1/yes/on or false/0/no/off")


class Settings(BaseSettings):
    """The entrypoint's configuration, read from `NIM_*` environment variables."""

    model_config = SettingsConfigDict(
        arbitrary_types_allowed=True,  # S3Url
        env_prefix="NIM_",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
        validate_default=False,
    )

    model_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("model_name", "NIM_MODEL_NAME", "NIM_MODEL_PATH"),
        description="The base model: a local folder (or a hub id where a hub is reachable).",
    )
    served_model_name: str | None = Field(
        default=None,
        description="The name clients use for the base model. Default: NIM_MODEL_NAME as given.",
    )
    peft_source: Path | S3Url | None = Field(
        default=None,
        description="Folder of LoRA adapters, one sub-folder per adapter; the folder name is the "
        "adapter name. Or (ours) `s3://BUCKET/PREFIX`: one sub-prefix per adapter in an "
        "S3-compatible store, with credentials, region and endpoint from the standard AWS "
        "variables (`AWS_ENDPOINT_URL` for stores other than AWS); needs the `s3` extra. Or "
        "(ours) a list of adapters, a `.yaml` or `.json` file in KServe's shape "
        "(`adapters: [{name, uri, revision}]`, URIs: a folder, `file://`, `s3://BUCKET/PREFIX`, "
        "`hf://ORG/REPO`), read again every pass.",
    )
    peft_refresh_interval: float | None = Field(
        default=None,
        description="Seconds between safety-net scans of NIM_PEFT_SOURCE (file-system events "
        "trigger scans at once). Unset: static mode (adapters are read once at start).",
    )
    peft_watch_events: bool = Field(
        default=True,
        description="(ours) React to file-system events in NIM_PEFT_SOURCE within "
        "~0.1 s; the interval poll always runs as well. Set false only to measure polling.",
    )
    max_gpu_loras: int = Field(
        default=8, description="Adapters in one batch (vLLM --max-loras, SGLang "
        "--max-loras-per-batch)."
    )
    max_cpu_loras: int | None = Field(
        default=None,
        description="Adapters kept in host memory (vLLM --max-cpu-loras, SGLang "
        "--max-loaded-loras). Default: 16, or NIM_MAX_GPU_LORAS if that is larger.",
    )
    max_lora_rank: int | None = Field(
        default=None,
        description="Largest adapter rank accepted. Default: the smallest value the backend "
        "allows that covers every adapter present at start, never below 16.",
    )
    model_profile: str | None = Field(
        default=None, description="A profile by name or id. Unset: chosen from the hardware."
    )
    profiles_path: Path | None = Field(
        default=None,
        description="(ours) A folder of extra profile files (YAML), added to the "
        "built-in ones; a file with a built-in profile's name replaces it.",
    )
    server_port: int = Field(default=8000, description="The public port.")
    cache_path: Path = Field(
        default=Path(".cache"),
        description="Where the entrypoint keeps files (demo model, adapter snapshots).",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR, CRITICAL.")
    jsonl_logging: bool = Field(default=False, description="Log one JSON object per line.")
    max_model_len: int | None = Field(
        default=None, description="Maximum context length, passed to the backend."
    )
    tensor_parallel_size: int | None = Field(
        default=None, description="Tensor parallelism; overrides the profile's tp."
    )
    pipeline_parallel_size: int | None = Field(
        default=None, description="Pipeline parallelism; overrides the profile's pp."
    )
    passthrough_args: str | None = Field(
        default=None, description="Extra backend arguments, appended verbatim (shell quoting)."
    )
    peft_api_enabled: bool = Field(
        default=True,
        description="(ours) In dynamic mode, the public port also takes runtime adapter calls "
        "in vLLM's form (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`) and SGLang's "
        "(`POST /load_lora_adapter`, `/unload_lora_adapter`), as NIM does. Set false to manage "
        "adapters through the folder only.",
    )
    peft_api_allowed_paths: str | None = Field(
        default=None,
        description="(ours) Folders that runtime API loads may read adapters from, besides "
        "NIM_PEFT_SOURCE, and `s3://BUCKET[/PREFIX]` or `hf://ORG[/REPO]` prefixes they may "
        "fetch, separated by ',' or ':'; anything else (links and `..` resolved) is a 403.",
    )
    peft_api_max_adapters: int = Field(
        default=256,
        description="(ours) How many adapters runtime API calls may have loaded at once; a load "
        "beyond it gets a 400 saying so. Each holds a snapshot under NIM_CACHE_PATH (identical "
        "files are stored once), so this bounds the disk the API can fill.",
    )
    peft_api_timeout_secs: float = Field(
        default=30.0, description="Timeout of one adapter load or unload call, in seconds."
    )
    snapshot_grace_secs: float = Field(
        default=30.0,
        description="(ours) Seconds an adapter snapshot that nothing serves any more is kept "
        "(unused) before it is deleted: the backend may still read it for requests in flight.",
    )
    backend_health_timeout_secs: float = Field(
        default=60.0,
        description="(ours) Once ready, the backend's health route is polled every few "
        "seconds; readiness follows it, and a backend that has not answered it for this many "
        "seconds is stopped and the entrypoint exits non-zero.",
    )

    # ---- the backend's own variables that the entrypoint must honour too ----

    vllm_api_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("vllm_api_key", "VLLM_API_KEY"),
        description="(vLLM's) With it (or `--api-key` in NIM_PASSTHROUGH_ARGS, on either "
        "backend) the public port requires `Authorization: Bearer <key>` on every route but the "
        "probes (/v1/health/*, /health), /version and /metrics, and the entrypoint uses the key "
        "for its own calls.",
    )
    vllm_plugins: str | None = Field(
        default=None,
        validation_alias=AliasChoices("vllm_plugins", "VLLM_PLUGINS"),
        description="(vLLM's) Comma-separated vLLM plugins to load; the entrypoint's own "
        "plugin (`lora_entrypoint`) is added to the list.",
    )

    # ---- field checks: messages are completed with the variable name by `load_settings` ----

    @field_validator("jsonl_logging", "peft_watch_events", "peft_api_enabled", mode="before")
    @classmethod
    def _bool(cls, value: Any) -> bool:
        return _parse_bool(value)

    @field_validator("peft_source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            if not value.startswith(SCHEME):
                raise ValueError(
                    f"only folders and {SCHEME} URLs are supported; for another object store "
                    "use its S3-compatible endpoint (AWS_ENDPOINT_URL) with an s3:// URL")
            return S3Url.parse(value)
        return value

    @field_validator("peft_refresh_interval", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip() == "" else value

    @field_validator("peft_refresh_interval")
    @classmethod
    def _interval_positive(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be a number of seconds above 0 (unset it for static mode)")
        return value

    @field_validator("server_port")
    @classmethod
    def _port(cls, value: int) -> int:
        return _within(value, 1, 65535, "must be a TCP port between 1 and 65535")

    @field_validator("max_gpu_loras", "max_cpu_loras", "max_model_len", "tensor_parallel_size",
                     "pipeline_parallel_size", "peft_api_max_adapters")
    @classmethod
    def _positive_int(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a whole number of at least 1")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be a positive rank such as 8, 16, 32 or 64")
        return value

    @field_validator("peft_api_timeout_secs", "backend_health_timeout_secs", "snapshot_grace_secs")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be a number of seconds above 0")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(sorted(LOG_LEVELS))}")
        return {"DEFAULT": "INFO", "TRACE": "DEBUG"}.get(level, level)

    @field_validator("passthrough_args")
    @classmethod
    def _passthrough(cls, value: str | None) -> str | None:
        return _splittable(value)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_gpu_loras:
            raise ValueError(f"NIM_MAX_CPU_LORAS={self.max_cpu_loras} is below NIM_MAX_GPU_LORAS="
                             f"{self.max_gpu_loras}; the host cache must hold at least as many "
                             "adapters as one batch: raise NIM_MAX_CPU_LORAS or lower "
                             "NIM_MAX_GPU_LORAS")
        return self

    # ---- derived values ----

    @property
    def dynamic(self) -> bool:
        """True when the adapter folder is watched (NIM_PEFT_REFRESH_INTERVAL set)."""
        return self.peft_source is not None and self.peft_refresh_interval is not None

    @property
    def api_enabled(self) -> bool:
        """The runtime adapter API answers (dynamic mode and NIM_PEFT_API_ENABLED)."""
        return self.dynamic and self.peft_api_enabled

    @property
    def api_allowed_paths(self) -> list[str]:
        """The folders NIM_PEFT_API_ALLOWED_PATHS lists (its URI prefixes: `api_allowed_uris`)."""
        return [p for p in split_allowed(self.peft_api_allowed_paths) if not is_remote(p)]

    @property
    def api_allowed_uris(self) -> list[str]:
        return [p for p in split_allowed(self.peft_api_allowed_paths) if is_remote(p)]

    @property
    def api_roots(self) -> tuple[Path, ...]:
        """The folders runtime API loads may read from: NIM_PEFT_SOURCE (a folder), then
        NIM_PEFT_API_ALLOWED_PATHS, each with its links resolved."""
        listed = [Path(p) for p in self.api_allowed_paths]
        folder = source_folder(self)
        roots = [folder, *listed] if folder is not None else listed
        return tuple(Path(os.path.realpath(root.expanduser())) for root in roots)

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model_name or ""

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras or max(16, self.max_gpu_loras)

    @property
    def passthrough(self) -> list[str]:
        return shlex.split(self.passthrough_args) if self.passthrough_args else []


def _describe(error: Mapping[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not loc:
        return message
    field = loc[0]
    name = "NIM_MODEL_NAME" if field in ("model_name", "NIM_MODEL_NAME", "NIM_MODEL_PATH") else (
        field.upper() if field.upper().startswith(("NIM_", "VLLM_")) else env_name(field)
    )
    value = error.get("input")
    kind = error.get("type", "")
    if kind in ("int_parsing", "int_from_float"):
        message = "must be a whole number"
    elif kind == "float_parsing":
        message = "must be a number"
    shown = f"={value}" if isinstance(value, str | int | float) else ""
    return f"{name}{shown}: {message}"


def load_settings(*, need_model: bool = True, **overrides: Any) -> Settings:
    """Read the environment (and command-line overrides) into `Settings`; `ConfigError` if bad."""
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None
    check_paths(settings, need_model=need_model)
    return settings




def _unreadable(folder: Path) -> str | None:
    """The first entry of a model folder this process cannot read (vLLM would report it as
    missing, deep in a worker's traceback), or None."""
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.R_OK | os.X_OK, effective_ids=effective):
        return "the folder"
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return "the folder"
    for entry in entries:
        if entry.is_file() and not os.access(entry, os.R_OK, effective_ids=effective):
            return entry.name
    return None


def passthrough_values(settings: Settings, option: str, *, many: bool = False) -> list[str]:
    """The values NIM_PASSTHROUGH_ARGS gives `option` (`--opt v`, `--opt=v`), last one wins.

    With `many`, the option takes every value up to the next option (argparse `nargs="+"`).
    """
    args, found = settings.passthrough, []
    for i, arg in enumerate(args):
        if arg.startswith(option + "="):
            found = [arg.split("=", 1)[1]]
        elif arg == option:
            values = []
            for value in args[i + 1:]:
                if value.startswith("-") and len(value) > 1:
                    break
                values.append(value)
                if not many:
                    break
            found = values
    return found


def check_paths(settings: Settings, *, need_model: bool = True) -> None:
    """Checks that need the file system; raises `ConfigError`."""
    if not need_model:
        pass
    elif not settings.model_name:
        raise ConfigError(
            "NIM_MODEL_NAME is not set: point it (or NIM_MODEL_PATH) at the base model folder"
        )
    else:
        model = Path(settings.model_name).expanduser()
        looks_local = settings.model_name.startswith(("/", ".", "~")) or model.exists()
        if looks_local and not model.is_dir():
            raise ConfigError(
                f"NIM_MODEL_NAME={settings.model_name}: no such folder; mount the model there or "
                "fix the path"
            )
        if looks_local and (unreadable := _unreadable(model)) is not None:
            raise ConfigError(
                f"NIM_MODEL_NAME={settings.model_name}: {unreadable} cannot be read by this user "
                f"(uid {os.geteuid()}); make the model readable (chmod -R a+rX) or run as "
                "its owner (docker run -u UID:GID)"
            )
    if isinstance(settings.peft_source, S3Url):
        if importlib.util.find_spec("boto3") is None:
            raise ConfigError(f"NIM_PEFT_SOURCE={settings.peft_source}: the S3 client (boto3) "
                              f"is not installed; {INSTALL}")
    elif settings.peft_source is not None:
        source = settings.peft_source.expanduser()
        if not source.exists():
            raise ConfigError(
                f"NIM_PEFT_SOURCE={settings.peft_source}: no such folder; create it or mount "
                "your adapter folder there"
            )
        if not source.is_dir() and not source_is_list(settings):
            raise ConfigError(
                f"NIM_PEFT_SOURCE={settings.peft_source}: is a file, not a folder; point it at "
                "the folder that holds one sub-folder per adapter, or at a list of adapters "
                "(a .yaml or .json file)"
            )
    if (problem := allowed_problem(settings.peft_api_allowed_paths)) is not None:
        raise ConfigError(problem)
    if settings.peft_refresh_interval is not None and settings.peft_source is None:
        raise ConfigError(
            "NIM_PEFT_REFRESH_INTERVAL is set but NIM_PEFT_SOURCE is not: set NIM_PEFT_SOURCE "
            "to the adapter folder to watch"
        )


def _splittable(value: str | None) -> str | None:
    """`value`, when it splits into arguments like a shell line (NIM_PASSTHROUGH_ARGS)."""
    if value is not None:
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"cannot be split into arguments ({exc}); check its quoting") from None
    return value


def source_is_list(settings: Settings) -> bool:
    """NIM_PEFT_SOURCE names a list of adapters (a .yaml, .yml or .json file)."""
    source = settings.peft_source
    return isinstance(source, Path) and is_list_file(source)


def source_folder(settings: Settings) -> Path | None:
    """NIM_PEFT_SOURCE when it is a folder of adapters (not a store, not a list)."""
    source = settings.peft_source
    return source if isinstance(source, Path) and not source_is_list(settings) else None


def _within(value: int, low: int, high: int, message: str) -> int:
    if not low <= value <= high:
        raise ValueError(message)
    return value
