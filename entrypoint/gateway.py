"""Gateway: the public port. Routes OpenAI requests to the backend, answers health checks.

Thin: it translates the model name through the registry, refuses what is not ready with an
OpenAI error, and streams responses through chunk by chunk. It never loads or unloads adapters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import __version__
from .backends import Backend
from .registry import Registry, State, Traffic

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
# Hop-by-hop and length headers are the proxy's own business.
DROP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                "content-encoding"}


@dataclass
class GatewayState:
    """What the gateway needs to route: filled in by the service as things come up."""

    served_name: str
    backend: Backend
    registry: Registry
    client: httpx.AsyncClient
    traffic: Traffic = field(default_factory=Traffic)
    ready: bool = False
    backend_up: bool = False
    static_mode: bool = False
    metadata: dict = field(default_factory=dict)


def openai_error(status: int, message: str, kind: str, code: str | int | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code or status}}
    return JSONResponse(body, status_code=status)


def not_found(state: GatewayState, model: str, name: str) -> Response:
    """A 404 whose message says why `model` cannot be used now."""
    record = state.registry.get(name)
    if record is None:
        message = f"The model '{model}' does not exist."
        if state.static_mode:
            message += " (static mode: adapters added after start need a restart)"
    elif record.state is State.PENDING:
        message = f"The adapter '{name}' is not ready yet: {record.reason}."
    elif record.state is State.LOADING:
        message = f"The adapter '{name}' is still loading; try again in a moment."
    elif record.state is State.FAILED:
        message = f"The adapter '{name}' failed to load: {record.reason}."
    else:
        message = f"The adapter '{name}' is being removed."
    return openai_error(404, message, "NotFoundError", "model_not_found")


def _forward_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() not in DROP_HEADERS}


async def _proxy(
    state: GatewayState, request: Request, content: bytes | None,
    done: Callable[[], None] = lambda: None,
) -> Response:
    """Forward to the backend and stream the answer back; `done` runs once when it is over."""
    finished = False

    def finish() -> None:
        nonlocal finished
        if not finished:
            finished = True
            done()

    upstream = state.client.build_request(
        request.method,
        request.url.path,
        params=request.query_params,
        headers=_forward_headers(request),
        content=content,
    )
    try:
        response = await state.client.send(upstream, stream=True)
    except httpx.TimeoutException:
        finish()
        return openai_error(504, "The backend did not answer in time.", "GatewayTimeout")
    except httpx.HTTPError as exc:
        finish()
        return openai_error(502, f"The backend is not reachable ({type(exc).__name__}).",
                            "BadGateway")

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()
            finish()

    async def cleanup() -> None:
        await response.aclose()
        finish()

    headers = {k: v for k, v in response.headers.items() if k.lower() not in DROP_HEADERS}
    return StreamingResponse(body(), status_code=response.status_code, headers=headers,
                             background=BackgroundTask(cleanup))


def build_app(state: GatewayState) -> Starlette:
    """The public ASGI application."""

    async def live(request: Request) -> Response:
        return JSONResponse({"object": "health.response", "message": "Service is live."})

    async def ready(request: Request) -> Response:
        if state.ready:
            return JSONResponse({"object": "health.response", "message": "Service is ready."})
        return JSONResponse(
            {"object": "health.response", "message": "Service is not ready yet."},
            status_code=503,
        )

    async def models(request: Request) -> Response:
        if not state.backend_up:
            return openai_error(503, "The model is still starting.", "ServiceUnavailable")
        try:
            response = await state.client.get("/v1/models")
            cards = response.json().get("data", [])
        except (httpx.HTTPError, ValueError) as exc:
            return openai_error(502, f"The backend is not reachable ({type(exc).__name__}).",
                                "BadGateway")
        served = []
        for card in cards:
            if not card.get("parent"):
                served.append(card)
                continue
            record = state.registry.ready(card["id"])
            if record is not None:  # only adapters we serve; the folder is what users know
                served.append({**card, "root": str(record.source or card.get("root"))})
        return JSONResponse({"object": "list", "data": served})

    async def inference(request: Request) -> Response:
        if not state.backend_up:
            return openai_error(503, "The model is still starting.", "ServiceUnavailable")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return openai_error(413, "Request body too large.", "BadRequestError")
        try:
            body = json.loads(raw)
        except ValueError:
            return openai_error(400, "Request body is not valid JSON.", "BadRequestError")
        if not isinstance(body, dict):
            return openai_error(400, "Request body must be a JSON object.", "BadRequestError")
        if "lora_path" in body:
            return openai_error(
                400, "'lora_path' is not accepted: name the adapter in 'model' ('<adapter>' or "
                f"'{state.served_name}:<adapter>').", "BadRequestError")
        model = body.get("model")
        if model is not None and model != state.served_name:
            if not isinstance(model, str):
                return openai_error(400, "'model' must be a string.", "BadRequestError")
            name = model.removeprefix(state.served_name + ":")
            if state.registry.ready(name) is None:
                return not_found(state, model, name)
            await state.traffic.enter(name)  # waits while its weights are being swapped
            if state.registry.ready(name) is None:  # removed while we waited
                state.traffic.leave(name)
                return not_found(state, model, name)
            body["model"] = state.backend.request_model(state.served_name, name)
            raw = json.dumps(body).encode()
            return await _proxy(state, request, raw, done=lambda: state.traffic.leave(name))
        return await _proxy(state, request, raw)

    async def metadata(request: Request) -> Response:
        return JSONResponse(state.metadata)

    async def version(request: Request) -> Response:
        return JSONResponse({"release": __version__, "api": "1.0.0"})

    async def unknown(request: Request) -> Response:
        return openai_error(404, f"Route {request.url.path} not found.", "NotFoundError")

    routes = [
        Route("/v1/health/live", live, methods=["GET"]),
        Route("/v1/health/ready", ready, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/metadata", metadata, methods=["GET"]),
        Route("/v1/version", version, methods=["GET"]),
        Route("/v1/completions", inference, methods=["POST"]),
        Route("/v1/chat/completions", inference, methods=["POST"]),
        Route("/{path:path}", unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ]
    return Starlette(routes=routes)
