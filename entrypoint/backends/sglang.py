"""SGLang: its command line, its runtime LoRA endpoints and how to read their answers.

Everything this project knows about SGLang's flags, routes, bodies and model-name forms is here
(see docs/sglang.md). Starts nothing itself; the supervisor runs the argv.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import httpx

from entrypoint.backends.base import Backend, Outcome, Reply, StartSpec, transient
from entrypoint.config.settings import ConfigError

if TYPE_CHECKING:
    from entrypoint.config.profiles import Profile
    from entrypoint.config.settings import Settings

#: module names `--lora-target-modules` accepts
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head")


def target_modules(adapter_modules: list[tuple[str, ...]]) -> list[str]:
    """The union of the adapters' target modules, or `all` when none are known.

    SGLang refuses dynamic loading without `--lora-target-modules`, and every adapter loaded
    later must fit it; `all` is the safe choice when nothing is known yet.
    """
    union: set[str] = set()
    for modules in adapter_modules:
        names = set(modules)
        if not names or not names <= set(TARGET_MODULES):
            return ["all"]  # a regex, "all-linear" or an unknown module: take them all
        union |= names
    return sorted(union, key=TARGET_MODULES.index) if union else ["all"]


def api_answer(ok: bool, status: int, message: str, loaded: dict[str, str]) -> tuple[int, dict]:
    """SGLang's answer to a runtime LoRA call (`/load_lora_adapter`, `/unload_lora_adapter`):
    its body (`loaded`: the adapters served, name -> folder), and its status, 400 for every
    failure but a confinement (403) and an API that is off (404)."""
    body = {"success": ok, "error_message": "" if ok else message, "loaded_adapters": loaded}
    return (200 if ok else status if status in (403, 404) else 400), body


def already_loaded(name: object) -> str:
    """SGLang's words for a load of a name it serves already."""
    return f"Failed to load LoRA adapter {name} because it is already loaded"


def not_loaded(name: object, loaded: Iterable[str]) -> str:
    """SGLang's words for an unload of a name it does not serve (`loaded`: the names it does)."""
    return f"LoRA with name {name} does not exist. Loaded LoRAs: {', '.join(loaded)}"


class SGLangBackend(Backend):
    name: ClassVar[str] = "sglang"
    allowed_ranks: ClassVar[tuple[int, ...]] = ()  # any positive rank
    max_rank: ClassVar[int] = 512
    readiness_path: ClassVar[str] = "/health"
    packages: ClassVar[tuple[str, ...]] = ("sglang",)

    def check_settings(self, settings: Settings) -> None:
        if ":" in settings.served_name:
            raise ConfigError(
                f"NIM_SERVED_MODEL_NAME={settings.served_name}: contains ':', which SGLang uses "
                "to separate the model from the adapter; choose a name without ':'"
            )

    def rank_limit(self, wanted: int) -> int | None:
        return wanted if wanted <= self.max_rank else None

    def argv(
        self, spec: StartSpec, *, settings: Settings, profile: Profile, python: str
    ) -> list[str]:
        argv = [python, "-m", "sglang.launch_server"]
        argv += ["--model-path", spec.model, "--served-model-name", spec.served_name]
        argv += ["--host", spec.host, "--port", str(spec.port)]
        if spec.api_key:  # every route but /health* and /metrics* then wants it
            argv += ["--api-key", spec.api_key]
        argv += list(profile.backend_args)
        argv += ["--tp-size", str(spec.tp)]
        if spec.pp > 1:
            argv += ["--pp-size", str(spec.pp)]
        if settings.max_model_len:
            argv += ["--context-length", str(settings.max_model_len)]
        # The base model takes one slot of a batch: NIM_MAX_GPU_LORAS adapters need one more.
        per_batch = settings.max_gpu_loras + 1
        loaded = max(settings.cpu_loras, per_batch, len(spec.static_adapters))
        argv += ["--enable-lora", "--max-loras-per-batch", str(per_batch)]
        argv += ["--max-loaded-loras", str(loaded)]
        argv += ["--max-lora-rank", str(spec.max_lora_rank)]
        argv += ["--lora-target-modules", *target_modules(list(spec.adapter_modules))]
        if spec.static_adapters:
            argv.append("--lora-paths")
            argv += [f"{name}={path}" for name, path in spec.static_adapters]
        return argv

    def env(self, spec: StartSpec, *, settings: Settings, profile: Profile) -> dict[str, str]:
        return dict(profile.env)

    def request_model(self, served_name: str, adapter: str | None) -> str:
        # A bare adapter name is silently served by the base model: always send the full form.
        return f"{served_name}:{adapter}" if adapter else served_name

    async def _call(
        self, client: httpx.AsyncClient, path: str, body: dict, *, on_400: Outcome,
        known: tuple[tuple[str, Outcome], ...] = (),
    ) -> Reply:
        """POST to an admin route and read SGLang's `success`/`error_message` body.

        SGLang answers 400 for every failure; `known` maps message fragments to outcomes, and
        any other 400 is `on_400`.
        """
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            return transient(exc)
        try:
            data = response.json()
        except ValueError:
            data = {}
        message = str(data.get("error_message") or response.text.strip())
        if response.status_code == 200 and data.get("success"):
            return Reply(Outcome.DONE)
        if response.status_code == 400:
            outcome = next((o for fragment, o in known if fragment in message), on_400)
            return Reply(outcome, message)
        return Reply(Outcome.TRANSIENT, f"HTTP {response.status_code}: {message}")

    async def load(self, client: httpx.AsyncClient, name: str, path: Path) -> Reply:
        body = {"lora_name": name, "lora_path": str(path), "pinned": False}
        return await self._call(client, "/load_lora_adapter", body, on_400=Outcome.REFUSED,
                                known=(("already loaded", Outcome.ALREADY_LOADED),))

    async def unload(self, client: httpx.AsyncClient, name: str) -> Reply:
        return await self._call(client, "/unload_lora_adapter", {"lora_name": name},
                                on_400=Outcome.TRANSIENT,
                                known=(("does not exist", Outcome.GONE),))
