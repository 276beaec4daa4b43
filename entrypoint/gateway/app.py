"""Gateway: the public port. Routes OpenAI requests to the backend, answers health checks.

Thin: it translates the model name through the registry, refuses what is not ready with an
OpenAI error, and streams responses through chunk by chunk. It never loads or unloads adapters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from entrypoint import __version__
from entrypoint.adapters.names import display_name
from entrypoint.backends import Backend
from entrypoint.gateway.api import AdapterAPI, Answer
from entrypoint.gateway.bodies import BadBody, BodyFacts, BodyParser, json_object
from entrypoint.gateway.upstream import ClientResponse, Timeout, Upstream, UpstreamError
from entrypoint.metrics import Metrics
from entrypoint.reconcile.registry import AdapterRecord, Registry, State, Traffic

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
MAX_API_BODY_BYTES = 64 << 10  # a runtime API call: a name and a path
SMALL_BODY_BYTES = 1 << 20  # answers up to this size with a known length are sent in one piece
# Hop-by-hop and length headers are the proxy's own business; asking the backend not to compress
# keeps the bytes we stream through exactly what its headers say. The client's credentials were
# checked here; the backend gets the entrypoint's own (the upstream client adds them).
REQUEST_DROP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                "accept-encoding", "authorization"}
_REQUEST_DROP_RAW = frozenset(name.encode() for name in REQUEST_DROP)
RESPONSE_DROP = {"content-length", "transfer-encoding", "connection", "keep-alive"}
_RESPONSE_DROP_RAW = frozenset(name.encode() for name in RESPONSE_DROP)
CLIENT_GONE = 499  # (nginx's) the client closed its connection before an answer was sent
STREAM_BROKE = ("data: " + json.dumps({"error": {
    "message": "The backend stopped answering mid-stream.", "type": "BadGateway", "param": None,
    "code": 502}}) + "\n\n").encode()
access_log = logging.getLogger("entrypoint.access")

# The backend's routes this port forwards: an allowlist, not a denylist. Each vLLM release adds
# routes (0.32 lists 40, among them `/collective_rpc`, `/sleep`, `/scale_elastic_ep`, weight
# updates, and SageMaker's `POST /adapters` and `/invocations`, which load an adapter from any
# path or dispatch a body past the checks here). A denylist is only as safe as our reading of
# the newest release; an allowlist fails closed: a route nobody reviewed answers 404.
#: user-facing routes whose JSON body may name a model: routed like completions
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize",
                "/v1/score", "/v1/rerank", "/score", "/rerank", "/v2/rerank", "/pooling",
                "/classify")
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
#: user-facing routes that name no model: forwarded as they are
PLAIN_ROUTES = (("/v1/responses/{response_id}", "GET"),
                ("/v1/responses/{response_id}/cancel", "POST"),
                ("/health", "GET"), ("/version", "GET"))
_MODEL_PATHS = frozenset(MODEL_ROUTES)
_PLAIN_PATTERNS = tuple(
    (re.compile(re.sub(r"\{\w+\}", SAFE_SEGMENT.pattern, path)), method)
    for path, method in PLAIN_ROUTES)


@dataclass
class GatewayState:
    """What the gateway needs to route: filled in by the service as things come up."""

    served_name: str
    backend: Backend
    registry: Registry
    client: Upstream
    traffic: Traffic = field(default_factory=Traffic)
    #: None when the service is ready, else why not (the service decides)
    readiness: Callable[[], str | None] = lambda: "starting"
    backend_up: bool = False
    static_mode: bool = False
    metadata: dict = field(default_factory=dict)
    metrics: Metrics | None = None
    #: keys a client must send as `Authorization: Bearer <key>` (none: open)
    api_keys: tuple[str, ...] = ()
    #: the runtime adapter API (None: off)
    api: AdapterAPI | None = None
    #: reads request bodies (large ones away from the event loop)
    parser: BodyParser = field(default_factory=BodyParser)


def error_body(status: int, message: str, kind: str, code: str | int | None = None) -> dict:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code or status}}


def openai_error(status: int, message: str, kind: str, code: str | int | None = None) -> Response:
    return JSONResponse(error_body(status, message, kind, code), status_code=status)


# ---- routing a request body: pure decisions, no I/O ----

class AdapterLookup(Protocol):
    """The registry's read side that routing needs (`Registry` is one)."""

    def get(self, name: str) -> AdapterRecord | None: ...

    def ready(self, name: str) -> AdapterRecord | None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where an accepted request goes: the base model (`adapter` "") or one served adapter."""

    #: the client's `model` as sent (None when absent: the base model)
    model: str | None
    #: the adapter it names, "" for the base model
    adapter: str
    #: the `model` the backend needs in the body when it is not the client's (None: the
    #: request's own bytes are forwarded as they are)
    rename: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request answered here with an OpenAI error; `model` and `adapter` are for logs/metrics."""

    status: int
    message: str
    kind: str
    code: str | int | None = None
    #: the client's `model` as sent (any JSON value; None when absent or not parsed)
    model: object = None
    #: the adapter it named ("" when none)
    adapter: str = ""

    def response(self) -> Response:
        return openai_error(self.status, self.message, self.kind, self.code)


STARTING = Refusal(503, "The model is still starting.", "ServiceUnavailable")
TOO_LARGE = Refusal(413, f"Request body over {MAX_BODY_BYTES >> 20} MiB.", "BadRequestError")


#: the most of a client's text (a model name) that an answer or a log line repeats
SHOWN_CHARS = 256
#: the metric label and log name of every adapter name the service does not know (no adapter
#: name holds parentheses, so it cannot be a real one)
UNKNOWN_ADAPTER = "(unknown)"


def shown(text: object) -> str:
    """Client text as an answer or a log line repeats it: at most SHOWN_CHARS characters, on
    one line (control characters escaped)."""
    value = text if isinstance(text, str) else json.dumps(text)[:SHOWN_CHARS + 1]
    if len(value) > SHOWN_CHARS:
        value = value[:SHOWN_CHARS - 3] + "..."
    return value if value.isprintable() else value.encode("unicode_escape").decode()


def unknown_model(
    model: str | None, name: str, record: AdapterRecord | None, *, static_mode: bool,
) -> Refusal:
    """The 404 for `model` (adapter `name`, whose record is `record`): it says why not now."""
    if record is None:
        message = f"The model '{shown(model)}' does not exist."
        if static_mode:
            message += " (static mode: adapters added after start need a restart)"
    elif record.state is State.PENDING:
        message = f"The adapter '{name}' is not ready yet: {record.reason}."
    elif record.state is State.LOADING:
        message = f"The adapter '{name}' is still loading; try again in a moment."
    elif record.state is State.FAILED:
        message = f"The adapter '{name}' failed to load: {record.reason}."
    elif record.state is State.UNLOADED:
        message = f"The adapter '{name}' was {record.reason}."
    else:
        message = f"The adapter '{name}' is being removed."
    # (a name the service does not know is never a metric label: clients choose it)
    return Refusal(404, message, "NotFoundError", "model_not_found", model=model,
                   adapter=name if record is not None else UNKNOWN_ADAPTER)


def resolve(
    facts: BodyFacts | BadBody, *, served_name: str, adapters: AdapterLookup,
    static_mode: bool, request_model: Callable[[str, str], str],
) -> Target | Refusal:
    """Decide where an inference request goes (`facts`: what its body says), or why it is
    refused.

    `model` absent, empty or `served_name` is the base model (as vLLM reads it); `<adapter>` or
    `<served_name>:<adapter>` is an adapter, accepted only while `adapters.ready` has it;
    `request_model(served_name, adapter)` is the name the backend wants in the body. Reads
    `adapters`, changes nothing.
    """
    if isinstance(facts, BadBody):
        return Refusal(400, facts.message, "BadRequestError")
    model = facts.model
    if facts.lora_path:
        return Refusal(
            400, "'lora_path' is not accepted: name the adapter in 'model' ('<adapter>' or "
            f"'{served_name}:<adapter>').", "BadRequestError", model=model)
    if model is None or model == "" or model == served_name:
        return Target(model, "")
    if not isinstance(model, str):
        return Refusal(400, "'model' must be a string.", "BadRequestError", model=model)
    name = model.removeprefix(served_name + ":")
    if adapters.ready(name) is None:
        return unknown_model(model, name, adapters.get(name), static_mode=static_mode)
    wanted = request_model(served_name, name)
    return Target(model, name, None if wanted == model else wanted)


def describe(record: AdapterRecord) -> dict:
    """An adapter as `/v1/adapters` shows it."""
    return {
        "name": record.name,
        "origin": record.origin.value,
        "state": record.state.value,
        "ready": record.servable,
        "reason": record.reason or None,
        "rank": record.rank,
        "size": record.size,
        "version": record.version,
        "served_version": record.loaded_version or None,
        "source": record.url or (display_name(str(record.source)) if record.source else None),
        "since": datetime.fromtimestamp(record.since, UTC).isoformat(timespec="seconds"),
    }


# ---- the public application ----

class Gateway:
    """The public routes over a `GatewayState`, one method each; `app` is the ASGI app."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        routes = [
            Route("/v1/health/live", self.live, methods=["GET"]),
            Route("/v1/health/ready", self.ready, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/metadata", self.metadata, methods=["GET"]),
            Route("/v1/metrics", self.metrics, methods=["GET"]),
            Route("/v1/adapters", self.adapters, methods=["GET"]),
            Route("/v1/adapters/{name}", self.adapter, methods=["GET"]),
            Route("/v1/version", self.version, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_vllm, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_vllm, methods=["POST"]),
            Route("/load_lora_adapter", self.load_sglang, methods=["POST"]),
            Route("/unload_lora_adapter", self.unload_sglang, methods=["POST"]),
            Route("/{path:path}", self.unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ]
        self.router: ASGIApp = Starlette(routes=routes)
        app: ASGIApp = self.dispatch
        self.app: ASGIApp = BearerAuth(app, state.api_keys) if state.api_keys else app

    async def live(self, request: Request) -> Response:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    async def ready(self, request: Request) -> Response:
        reason = self.state.readiness()
        if reason is None:
            return JSONResponse({"object": "health.response", "message": "Service is ready."})
        return JSONResponse(
            {"object": "health.response", "message": f"Service is not ready: {reason}."},
            status_code=503,
        )

    async def models(self, request: Request) -> Response:
        state = self.state
        if not state.backend_up:
            return STARTING.response()
        try:
            status, content = await state.client.get("/v1/models", timeout=30)
        except (UpstreamError, TimeoutError) as exc:
            return openai_error(502, f"The backend is not reachable ({type(exc).__name__}).",
                                "BadGateway")
        cards = _model_cards(content) if status == 200 else None
        if cards is None:  # never an empty list for an upstream error
            return openai_error(502, f"The backend answered /v1/models with HTTP {status} "
                                f"({content[:200].decode(errors='replace')}).", "BadGateway")
        served = []
        for card in cards:
            if not card.get("parent"):
                served.append(card)
                continue
            record = state.registry.ready(card["id"])
            if record is not None:  # only adapters we serve; the folder is what users know
                root = record.url or display_name(str(record.source or card.get("root")))
                served.append({**card, "root": root})
        return JSONResponse({"object": "list", "data": served})

    # ---- the hot path: plain ASGI, no request objects, no router ----

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """MODEL_ROUTES and PLAIN_ROUTES in plain ASGI (every token a user streams passes
        here); everything else through the Starlette router."""
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path in _MODEL_PATHS:
                await self.inference(scope, receive, send)
                return
            if any(m == method and pattern.fullmatch(path) for pattern, m in _PLAIN_PATTERNS):
                await self.plain(scope, receive, send)
                return
        await self.router(scope, receive, send)

    async def inference(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Completions, chat and the other MODEL_ROUTES: route by `model`, then stream
        through."""
        started = time.perf_counter()
        state = self.state
        if not state.backend_up:
            await self._refuse(scope, send, STARTING, started)
            return
        raw = await read_asgi_body(scope, receive)
        if raw is None:  # the client went away before its request was whole
            return
        if isinstance(raw, Refusal):
            await self._refuse(scope, send, raw, started)
            return
        target = resolve(await state.parser.facts(raw), served_name=state.served_name,
                         adapters=state.registry, static_mode=state.static_mode,
                         request_model=state.backend.request_model)
        if isinstance(target, Refusal):
            await self._refuse(scope, send, target, started)
            return
        model, name = target.model, target.adapter
        body = raw if target.rename is None else await state.parser.renamed(raw, target.rename)
        if isinstance(body, BadBody):
            await self._refuse(scope, send, Refusal(400, body.message, "BadRequestError",
                                                    model=model), started)
            return
        if name:
            await state.traffic.enter(name)  # waits while its weights are being swapped
            if state.registry.ready(name) is None:  # removed while we waited
                state.traffic.leave(name)
                refusal = unknown_model(model, name, state.registry.get(name),
                                        static_mode=state.static_mode)
                await self._refuse(scope, send, replace(refusal, adapter=name), started)
                return

        def done(status: int) -> None:  # counted when its stream is over
            if name:
                state.traffic.leave(name)
            self._record(scope, model=model, adapter=name, status=status, started=started)

        await self._forward(scope, receive, send, body, done)

    async def plain(self, scope: Scope, receive: Receive, send: Send) -> None:
        """PLAIN_ROUTES: forwarded as they are."""
        if not self.state.backend_up:
            await send_refusal(send, STARTING)
            return
        raw = await read_asgi_body(scope, receive)
        if isinstance(raw, Refusal):
            await send_refusal(send, raw)
        elif raw is not None:
            await self._forward(scope, receive, send, raw, lambda status: None)

    # ---- the runtime adapter API, in vLLM's and SGLang's forms ----

    async def load_vllm(self, request: Request) -> Response:
        body = await self._api_body(request)
        if isinstance(body, Answer):
            return self._vllm_answer(request, body)
        answer = await self._api().load(body.get("lora_name"), body.get("lora_path"),
                                        replace=_lax_bool(body.get("load_inplace")))
        return self._vllm_answer(request, answer, body.get("lora_name"))

    async def unload_vllm(self, request: Request) -> Response:
        body = await self._api_body(request)
        if isinstance(body, Answer):
            return self._vllm_answer(request, body)
        answer = await self._api().unload(body.get("lora_name"))
        return self._vllm_answer(request, answer, body.get("lora_name"))

    async def load_sglang(self, request: Request) -> Response:
        body = await self._api_body(request)
        if isinstance(body, Answer):
            return self._sglang_answer(request, body)
        answer = await self._api().load(body.get("lora_name"), body.get("lora_path"))
        if answer.status == 400 and "has already been loaded" in answer.message:
            answer = Answer.error(400, f"Failed to load LoRA adapter {body.get('lora_name')} "
                                  "because it is already loaded")  # SGLang's words
        return self._sglang_answer(request, answer, body.get("lora_name"))

    async def unload_sglang(self, request: Request) -> Response:
        body = await self._api_body(request)
        if isinstance(body, Answer):
            return self._sglang_answer(request, body)
        answer = await self._api().unload(body.get("lora_name"))
        if answer.status == 404:  # SGLang's words and status
            loaded = ", ".join(self._api().loaded_adapters())
            answer = Answer.error(400, f"LoRA with name {body.get('lora_name')} does not exist. "
                                  f"Loaded LoRAs: {loaded}")
        return self._sglang_answer(request, answer, body.get("lora_name"))

    def _api(self) -> AdapterAPI:
        api = self.state.api
        if api is None:
            api = self.state.api = AdapterAPI(
                registry=self.state.registry, served_name=self.state.served_name, source=None,
                reconciler=None, timeout=0, off="this server was started without it")
        return api

    async def _api_body(self, request: Request) -> dict | Answer:
        """The JSON object of an API call, or why there is none."""
        if (refused := self._api().refusal()) is not None:
            return refused
        raw = await read_asgi_body(request.scope, request.receive, limit=MAX_API_BODY_BYTES)
        if raw is None:
            return Answer.error(400, "The client went away.")
        if isinstance(raw, Refusal):
            return Answer.error(raw.status, raw.message)
        body = json_object(raw)
        return Answer.error(400, body.message) if isinstance(body, BadBody) else body

    def _vllm_answer(self, request: Request, answer: Answer, name: object = None) -> Response:
        self._log_api(request, answer, name)
        if answer.ok:
            return PlainTextResponse(answer.message)
        return openai_error(answer.status, answer.message, answer.kind)

    def _sglang_answer(self, request: Request, answer: Answer, name: object = None) -> Response:
        """SGLang's body; its status is 400 for every failure but a confinement (403) and an
        API that is off (404)."""
        self._log_api(request, answer, name)
        body = {"success": answer.ok, "error_message": "" if answer.ok else answer.message,
                "loaded_adapters": self._api().loaded_adapters()}
        status = 200 if answer.ok else answer.status if answer.status in (403, 404) else 400
        return JSONResponse(body, status_code=status)

    @staticmethod
    def _log_api(request: Request, answer: Answer, name: object) -> None:
        level = logging.INFO if answer.ok else logging.WARNING
        message = "" if answer.ok else ": " + answer.message.encode("unicode_escape").decode()
        access_log.log(level, "%s %s lora_name=%s status=%d%s", request.method, request.url.path,
                       ascii(name) if isinstance(name, str) else name, answer.status, message,
                       extra={"fields": {"method": request.method, "path": request.url.path,
                                         "lora_name": name, "status": answer.status}})

    async def adapters(self, request: Request) -> Response:
        return JSONResponse({"object": "list",
                             "data": [describe(r) for r in self.state.registry.records()]})

    async def adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        record = self.state.registry.get(name)
        if record is None:
            return openai_error(404, f"No adapter folder named '{name}' has been seen.",
                                "NotFoundError", "adapter_not_found")
        return JSONResponse(describe(record))

    async def metrics(self, request: Request) -> Response:
        state = self.state
        own = state.metrics.render() if state.metrics is not None else b""
        backend = b""
        if state.backend_up:
            try:
                status, content = await state.client.get(state.backend.metrics_path, timeout=5)
                if status == 200:
                    backend = content
            except (UpstreamError, TimeoutError):
                pass
        return Response(own + backend, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def metadata(self, request: Request) -> Response:
        return JSONResponse(self.state.metadata)

    async def version(self, request: Request) -> Response:
        return JSONResponse({"release": __version__, "api": "1.0.0"})

    async def unknown(self, request: Request) -> Response:
        return openai_error(404, f"Route {request.url.path} not found.", "NotFoundError")

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, started: float) -> None:
        self._record(scope, model=refusal.model, adapter=refusal.adapter,
                     status=refusal.status, started=started)
        await send_refusal(send, refusal)

    def _record(
        self, scope: Scope, *, model: object, adapter: str, status: int, started: float,
    ) -> None:
        """Count one inference request and log it (one JSON object a line: NIM_JSONL_LOGGING).

        `adapter` is a name the service knew when it routed the request, or UNKNOWN_ADAPTER,
        and the log repeats at most SHOWN_CHARS of the client's `model`: what clients send
        never grows `/metrics` or a log line without bound."""
        if self.state.metrics is not None:
            self.state.metrics.request(adapter, status)
        if access_log.isEnabledFor(logging.INFO):
            duration = (time.perf_counter() - started) * 1000
            method, path = scope["method"], scope["path"]
            model = None if model is None else shown(model)
            access_log.info(
                "%s %s model=%s adapter=%s status=%d %.1f ms", method, path,
                model, adapter or "-", status, duration,
                extra={"fields": {"method": method, "path": path,
                                  "model": model, "adapter": adapter or None, "status": status,
                                  "duration_ms": round(duration, 2)}},
            )

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, content: bytes,
        done: Callable[[int], None],
    ) -> None:
        """Forward to the backend and stream the answer back, chunk by chunk as it comes.

        `done(status)` runs once when it is over: after the last chunk, on an error, or when
        the client goes away. The client is watched from the moment the request is sent, a
        non-streamed one too: its going away cancels the call, which closes the upstream
        connection, so the backend stops generating (counted 499 when nothing was answered).
        """
        finished = False

        def finish(status: int) -> None:
            nonlocal finished
            if not finished:
                finished = True
                done(status)

        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self._relay(scope, send, content, finish)
        except asyncio.CancelledError:
            if not gone or task.uncancel() > 0:
                raise
            finish(CLIENT_GONE)
        finally:
            watcher.cancel()

    async def _relay(self, scope: Scope, send: Send, content: bytes,
                     finish: Callable[[int], None]) -> None:
        # Headers as the client sent them, repeated ones too (the backend reads the first, as
        # it would without us).
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in _REQUEST_DROP_RAW]
        try:
            response = await self.state.client.send(
                scope["method"], scope["path"], headers=headers, body=content,
                query=scope.get("query_string", b"").decode("latin-1"))
        except Timeout:
            finish(504)
            await send_error(send, 504, "The backend did not answer in time.", "GatewayTimeout")
            return
        except UpstreamError as exc:
            finish(502)
            await send_error(send, 502, f"The backend is not reachable ({type(exc).__name__}).",
                             "BadGateway")
            return
        try:
            await self._answer(send, response, finish)
        finally:
            response.close()

    async def _answer(self, send: Send, response: ClientResponse,
                      finish: Callable[[int], None]) -> None:
        status = response.status
        out = [(k, v) for k, v in response.raw_headers if k.lower() not in _RESPONSE_DROP_RAW]
        event_stream = response.headers.get("content-type", "").startswith("text/event-stream")
        length = response.content_length
        if not event_stream and length is not None and length <= SMALL_BODY_BYTES:
            # A whole small answer (a non-streamed completion) is already on its way: one send.
            try:
                whole = await response.read()
            except (UpstreamError, TimeoutError):
                finish(502)
                await send_error(send, 502, "The backend stopped answering mid-response.",
                                 "BadGateway")
                return
            finish(status)
            out.append((b"content-length", str(len(whole)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": whole})
            return
        try:
            await send({"type": "http.response.start", "status": status, "headers": out})
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (UpstreamError, TimeoutError) as exc:  # the backend went away mid-answer
                log.warning("backend stream broke off (%s)", type(exc).__name__)
                if event_stream:
                    await send({"type": "http.response.body", "body": STREAM_BROKE,
                                "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            finish(status)


async def read_asgi_body(scope: Scope, receive: Receive, *, limit: int = MAX_BODY_BYTES
                         ) -> bytes | Refusal | None:
    """The request body; a 413 as soon as it is known to be over `limit`; None when the
    client went away."""
    too_large = TOO_LARGE if limit == MAX_BODY_BYTES else Refusal(
        413, f"Request body over {limit >> 10} KiB.", "BadRequestError")
    for key, value in scope["headers"]:
        if key == b"content-length":
            if value.isdigit() and int(value) > limit:
                return too_large
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def send_error(send: Send, status: int, message: str, kind: str,
                     code: str | int | None = None) -> None:
    """An OpenAI error answer, sent in plain ASGI."""
    body = json.dumps(error_body(status, message, kind, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def send_refusal(send: Send, refusal: Refusal) -> None:
    await send_error(send, refusal.status, refusal.message, refusal.kind, refusal.code)


def _lax_bool(value: object) -> bool:
    """A JSON flag read as vLLM's request model reads it (true, 1, "true", "yes", "on")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "t", "yes", "y", "on")
    return value is True or (type(value) is int and value == 1)


def build_app(state: GatewayState) -> ASGIApp:
    """The public ASGI application."""
    return Gateway(state).app


def _model_cards(content: bytes) -> list[dict] | None:
    """The cards of a `/v1/models` answer, or None when it is not one."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list) or not all(isinstance(c, dict) and "id" in c for c in cards):
        return None
    return cards


#: public routes that stay open with an API key set: probes and scrapers send none (vLLM leaves
#: `/health`, `/version` and `/metrics` open too)
OPEN_PREFIXES = ("/v1/health/",)
OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})


class BearerAuth:
    """Requires `Authorization: Bearer <key>` on every route but OPEN_PREFIXES and OPEN_PATHS:
    vLLM guards its /v1 routes; here the runtime adapter API and `/tokenize` are guarded too.

    Pure ASGI, so a refused request costs one header comparison; keys are compared as digests
    in constant time. OPTIONS requests pass, as in vLLM.
    """

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def authorized(self, header: bytes | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode()).digest()
        return any([hmac.compare_digest(digest, known) for known in self.digests])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and scope.get("method") != "OPTIONS"
                and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)):
            # The first Authorization header, as vLLM and Starlette read it.
            header = next((v for k, v in scope.get("headers") or () if k == b"authorization"),
                          None)
            if not self.authorized(header):
                response = openai_error(
                    401, "Missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                    "key the server was started with (VLLM_API_KEY or --api-key).",
                    "AuthenticationError", "invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
