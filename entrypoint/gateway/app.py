"""Gateway: the public port. Routes OpenAI requests to the backend, answers health checks.

Thin: it translates the model name through the registry, refuses what is not ready with an
OpenAI error, and streams responses through chunk by chunk. It never loads or unloads adapters.
This module wires the routes: the hot inference routes (`inference`), the runtime adapter API
(`api_routes`), bearer keys (`auth`); it answers health, `/v1/models`, `/v1/adapters`, metrics
and version itself.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from entrypoint import __version__
from entrypoint.adapters.names import display_name
from entrypoint.gateway.api_routes import APIRoutes
from entrypoint.gateway.auth import BearerAuth
from entrypoint.gateway.errors import STARTING, openai_error
from entrypoint.gateway.inference import Inference
from entrypoint.gateway.proxy import Proxy
from entrypoint.gateway.routing import is_model_route, is_plain_route
from entrypoint.gateway.state import GatewayState
from entrypoint.gateway.upstream import UpstreamError
from entrypoint.reconcile.registry import AdapterRecord


def describe(record: AdapterRecord, fetch: tuple[int, int] | None = None) -> dict:
    """An adapter as `/v1/adapters` shows it (`fetch`: the bytes done and in all of its
    download under way)."""
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
        "fetch": None if fetch is None else {"done_bytes": fetch[0],
                                             "total_bytes": fetch[1] or None},
    }


class Gateway:
    """The public routes over a `GatewayState`, one method each; `app` is the ASGI app."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.hot = Inference(state, Proxy(state))
        api = APIRoutes(state)
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
            Route("/v1/load_lora_adapter", api.load_vllm, methods=["POST"]),
            Route("/v1/unload_lora_adapter", api.unload_vllm, methods=["POST"]),
            Route("/load_lora_adapter", api.load_sglang, methods=["POST"]),
            Route("/unload_lora_adapter", api.unload_sglang, methods=["POST"]),
            Route("/v1/loras", api.load_dynamo, methods=["POST"]),
            Route("/v1/loras", api.list_dynamo, methods=["GET"]),
            Route("/v1/loras/{name:path}", api.unload_dynamo, methods=["DELETE"]),
            Route("/v1/lora_adapter/load", api.load_aibrix, methods=["POST"]),
            Route("/v1/lora_adapter/unload", api.unload_vllm, methods=["POST"]),
            Route("/{path:path}", self.unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ]
        self.router: ASGIApp = Starlette(routes=routes)
        app: ASGIApp = self.dispatch
        self.app: ASGIApp = BearerAuth(app, state.api_keys) if state.api_keys else app

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """MODEL_ROUTES and PLAIN_ROUTES in plain ASGI (every token a user streams passes
        here); everything else through the Starlette router."""
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if is_model_route(method, path):
                await self.hot.inference(scope, receive, send)
                return
            if is_plain_route(method, path):
                await self.hot.plain(scope, receive, send)
                return
        await self.router(scope, receive, send)

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

    async def adapters(self, request: Request) -> Response:
        progress = self.state.fetches.progress
        return JSONResponse({"object": "list", "data": [
            describe(r, progress(r.name)) for r in self.state.registry.records()]})

    async def adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        record = self.state.registry.get(name)
        if record is None:
            return openai_error(404, f"No adapter folder named '{name}' has been seen.",
                                "NotFoundError", "adapter_not_found")
        return JSONResponse(describe(record, self.state.fetches.progress(name)))

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
