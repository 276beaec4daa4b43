"""A test double of `python -m sglang.launch_server` with LoRA (see the SGLang reference).

SGLang cannot be installed on these machines, so the test suite puts `tests/fakes` on PYTHONPATH
and the entrypoint's real launch path starts this instead. It reproduces what the entrypoint
depends on, including SGLang's traps:
- start-up refuses dynamic LoRA without `--max-lora-rank` and `--lora-target-modules`, a served
  name with ':', and `--max-loaded-loras` below the per-batch slots or the `--lora-paths` count;
- `/health` answers 503 while warming up; `/v1/models` answers before that;
- `/load_lora_adapter` and `/unload_lora_adapter` (no `/v1`) answer `success`/`error_message`
  bodies, 200 on success and 400 on every failure, with SGLang's messages;
- with `--api-key`, every route but `/health*` and `/metrics*` wants `Authorization: Bearer
  <key>` and answers 401 `{"error": "Unauthorized"}` without it;
- the request `model` is split at the first ':'; a bare adapter name is served by the base model,
  silently, with 200; `base:unknown` is a 400; an unloaded adapter named in a request is reloaded
  from the path it had (SGLang remembers every path it ever loaded); `lora_path` in the body also
  selects an adapter.
It cannot run a model: completions are words drawn deterministically from the adapter's weights
and the prompt, so different weights answer differently and the same weights the same.
Every request it receives is appended to `$SGLANG_FAKE_LOG` (JSON lines) when that is set;
`$SGLANG_FAKE_ORPHAN_SECS` makes it leave an orphaned helper that exits after that many seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head")
WORDS = ("river", "stone", "lantern", "meadow", "copper", "whisper", "harbor", "ember", "violet",
         "thunder", "pebble", "orchard", "canyon", "saffron", "glacier", "marble")
WARMUP_SECS = 1.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sglang.launch_server")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--served-model-name")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-paths", nargs="*", default=None)
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-loaded-loras", type=int, default=None)
    parser.add_argument("--max-lora-rank", type=int, default=None)
    parser.add_argument("--lora-target-modules", nargs="*", default=None)
    parser.add_argument("--lora-backend", default="csgmv")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--api-key", default=None)
    return parser.parse_args(argv)


class AdapterError(Exception):
    pass


class FakeSGLang:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.served = args.served_model_name or args.model_path
        self.loaded: dict[str, str] = {}  # name -> path
        self.ever: dict[str, str] = {}  # every path ever loaded, by name
        self.weights: dict[str, str] = {}  # name -> digest of its weights
        self.lock = asyncio.Lock()
        self.started = time.monotonic()
        self.log_path = os.environ.get("SGLANG_FAKE_LOG")
        self.rank, self.modules = self._pool(args)

    # ---- start-up checks, as SGLang does them ----

    def _pool(self, args: argparse.Namespace) -> tuple[int, set[str]]:
        if ":" in self.served:
            sys.exit(f"ValueError: served_model_name cannot contain a colon (':'): {self.served}")
        paths = self._parse_lora_paths(args.lora_paths or [])
        if args.enable_lora or paths:
            if not paths and (args.max_lora_rank is None or args.lora_target_modules is None):
                sys.exit("ValueError: When no initial --lora-paths is provided, you need to "
                         "specify both --max-lora-rank and --lora-target-modules for LoRA "
                         "initialization.")
            loaded = args.max_loaded_loras
            if loaded is not None and (loaded < args.max_loras_per_batch or loaded < len(paths)):
                sys.exit("ValueError: max_loaded_loras should be greater than or equal to "
                         "max_loras_per_batch and the number of --lora-paths")
        configs = {name: self._read_config(path) for name, path in paths.items()}
        rank = args.max_lora_rank or max([c["r"] for c in configs.values()] or [0])
        if args.lora_target_modules is not None:
            modules = set(args.lora_target_modules)
            modules = set(MODULES) if "all" in modules else modules
        else:
            modules = {m for c in configs.values() for m in c["target_modules"]}
        self.rank, self.modules = rank, modules
        for name, path in paths.items():
            self._check_fits(name, configs[name])
            self._register(name, path)
        return rank, modules

    @staticmethod
    def _parse_lora_paths(entries: list[str]) -> dict[str, str]:
        paths = {}
        for entry in entries:
            if entry.startswith("{"):
                item = json.loads(entry)
                paths[item["lora_name"]] = item["lora_path"]
            elif "=" in entry:
                name, path = entry.split("=", 1)
                paths[name] = path
            else:
                paths[entry] = entry
        return paths

    @staticmethod
    def _read_config(path: str) -> dict:
        folder = Path(path)
        if not folder.is_dir():
            raise AdapterError(f"Repo id must be in the form 'repo_name' or "
                               f"'namespace/repo_name': '{path}'. Use `repo_type` argument if "
                               "needed.")
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
        except FileNotFoundError:
            raise AdapterError(f"Can't find 'adapter_config.json' at '{path}'") from None
        except ValueError as exc:
            raise AdapterError(f"Expecting value: {exc}") from None
        if config.get("use_dora"):
            raise AdapterError("DoRA is not supported by SGLang LoRA")
        if not (folder / "adapter_model.safetensors").exists() and not (
            folder / "adapter_model.bin"
        ).exists():
            raise AdapterError(f"No adapter weights found at {path}")
        modules = config.get("target_modules") or []
        config["target_modules"] = [modules] if isinstance(modules, str) else list(modules)
        return config

    def _check_fits(self, name: str, config: dict) -> None:
        if config["r"] > self.rank or not set(config["target_modules"]) <= self.modules:
            raise AdapterError(
                f"LoRA adapter {name} with rank {config['r']} and target modules "
                f"{sorted(config['target_modules'])} is incompatible with the current LoRA memory "
                f"pool configuration: max_lora_rank={self.rank}, "
                f"target_modules={sorted(self.modules)}.")

    def _register(self, name: str, path: str) -> None:
        folder = Path(path)
        weights = folder / "adapter_model.safetensors"
        if not weights.exists():
            weights = folder / "adapter_model.bin"
        self.weights[name] = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.loaded[name] = path
        self.ever[name] = path

    # ---- HTTP ----

    def record(self, request: Request, body: dict | None) -> None:
        if self.log_path:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps({"path": request.url.path, "body": body}) + "\n")

    def _reply(self, success: bool, message: str = "") -> JSONResponse:
        return JSONResponse({"success": success, "error_message": message,
                             "loaded_adapters": dict(self.loaded) if success else None},
                            status_code=200 if success else 400)

    async def load(self, request: Request) -> Response:
        body = await request.json()
        self.record(request, body)
        name, path = body.get("lora_name", ""), body.get("lora_path", "")
        async with self.lock:
            if name in self.loaded:
                return self._reply(False, f"Failed to load LoRA adapter {name} because it is "
                                          "already loaded")
            try:
                config = self._read_config(path)
                self._check_fits(name, config)
                self._register(name, path)
            except AdapterError as exc:
                return self._reply(False, str(exc))
        return self._reply(True)

    async def unload(self, request: Request) -> Response:
        body = await request.json()
        self.record(request, body)
        name = body.get("lora_name", "")
        async with self.lock:
            if name not in self.loaded:
                return self._reply(False, f"LoRA with name {name} does not exist. Loaded LoRAs: "
                                          f"{list(self.loaded)}")
            del self.loaded[name]
        return self._reply(True)

    async def health(self, request: Request) -> Response:
        if time.monotonic() - self.started < WARMUP_SECS:
            return Response(status_code=503)
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        cards = [{"id": self.served, "object": "model", "owned_by": "sglang",
                  "root": self.served, "parent": None}]
        cards += [{"id": name, "object": "model", "owned_by": "sglang", "root": path,
                   "parent": self.served} for name, path in self.loaded.items()]
        return JSONResponse({"object": "list", "data": cards})

    def _adapter_for(self, body: dict) -> str | None:
        """SGLang's reading of a request: `base:adapter` or `lora_path`; else the base model."""
        if body.get("lora_path"):
            return body["lora_path"]
        model = str(body.get("model") or "")
        if ":" not in model:
            return None  # a bare adapter name is served by the base model, silently
        return model.split(":", 1)[1]

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.record(request, body)
        adapter = self._adapter_for(body)
        if adapter is not None and adapter not in self.loaded:
            if adapter not in self.ever:
                return JSONResponse({"object": "error", "message": "Got LoRA adapter that has "
                                     f"never been loaded: {adapter}", "type": "BadRequestError",
                                     "code": 400}, status_code=400)
            async with self.lock:  # the silent reload from the old path
                self._register(adapter, self.ever[adapter])
        seed = self.weights.get(adapter, "base:" + self.args.model_path) if adapter else (
            "base:" + self.args.model_path)
        chat = request.url.path.endswith("chat/completions")
        prompt = json.dumps(body.get("messages")) if chat else str(body.get("prompt", ""))
        count = int(body.get("max_tokens") or 16)
        words = []
        state = hashlib.sha256(f"{seed}|{prompt}".encode()).digest()
        for _ in range(count):
            words.append(WORDS[state[0] % len(WORDS)])
            state = hashlib.sha256(state).digest()
        model = body.get("model") or self.served
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(self._stream(words, model, created, chat),
                                     media_type="text/event-stream")
        text = " " + " ".join(words)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                   "finish_reason": "length"} if chat else
                  {"index": 0, "text": text, "finish_reason": "length"})
        return JSONResponse({
            "id": f"cmpl-{state.hex()[:16]}", "object": "chat.completion" if chat else
            "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": count,
                      "total_tokens": len(prompt.split()) + count}})

    async def _stream(self, words: list[str], model: str, created: int, chat: bool):
        for i, word in enumerate(words):
            piece = " " + word
            delta = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                     else {"index": 0, "text": piece, "finish_reason": None})
            if i == len(words) - 1:
                delta["finish_reason"] = "length"
            chunk = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat else
                     "text_completion", "created": created, "model": model, "choices": [delta]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            await asyncio.sleep(0.005)
        yield b"data: [DONE]\n\n"

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette):
            yield
            print("[fake sglang] graceful shutdown", flush=True)  # after SIGTERM, not SIGKILL

        key = self.args.api_key

        async def authenticate(request: Request, call_next):  # SGLang's add_api_key_middleware
            open_path = request.url.path.startswith(("/health", "/metrics"))
            if key and request.method != "OPTIONS" and not open_path and (
                    request.headers.get("Authorization") != "Bearer " + key):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

        return Starlette(lifespan=lifespan, middleware=[
            Middleware(BaseHTTPMiddleware, dispatch=authenticate)], routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/health_generate", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/load_lora_adapter", self.load, methods=["POST"]),
            Route("/unload_lora_adapter", self.unload, methods=["POST"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
        ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        server = FakeSGLang(args)
    except AdapterError as exc:
        sys.exit(f"Failed to load LoRA adapter at start-up: {exc}")
    orphan = os.environ.get("SGLANG_FAKE_ORPHAN_SECS")
    if orphan:  # a helper that outlives its parent, as engine processes can (tests of reaping)
        subprocess.Popen(["sh", "-c", f"sleep {float(orphan)} &"]).wait()
    print(f"[fake sglang] serving {server.served} on {args.host}:{args.port} "
          f"(max_lora_rank={server.rank}, target_modules={sorted(server.modules)})", flush=True)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
