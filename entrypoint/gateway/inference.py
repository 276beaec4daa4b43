"""Inference requests (MODEL_ROUTES) and the backend's plain user routes (PLAIN_ROUTES), in
plain ASGI: every token a user streams passes here.

It reads the body, asks `routing` where the request goes, holds it at an adapter's gate while
its weights are swapped, hands it to the `Proxy`, and counts and logs it. It never loads or
unloads adapters and never changes the registry.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from starlette.types import Receive, Scope, Send

from entrypoint.gateway.bodies import BadBody
from entrypoint.gateway.errors import STARTING, Refusal
from entrypoint.gateway.intake import read_asgi_body
from entrypoint.gateway.proxy import Proxy
from entrypoint.gateway.routing import resolve, shown, unknown_model
from entrypoint.gateway.state import GatewayState

access_log = logging.getLogger("entrypoint.access")


class Inference:
    """The hot routes over a `GatewayState`: `inference` (MODEL_ROUTES) and `plain`."""

    def __init__(self, state: GatewayState, proxy: Proxy) -> None:
        self.state = state
        self.proxy = proxy

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

        await self.proxy.forward(scope, receive, send, body, done)

    async def plain(self, scope: Scope, receive: Receive, send: Send) -> None:
        """PLAIN_ROUTES: forwarded as they are."""
        if not self.state.backend_up:
            await STARTING.send(send)
            return
        raw = await read_asgi_body(scope, receive)
        if isinstance(raw, Refusal):
            await raw.send(send)
        elif raw is not None:
            await self.proxy.forward(scope, receive, send, raw, lambda status: None)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, started: float) -> None:
        self._record(scope, model=refusal.model, adapter=refusal.adapter,
                     status=refusal.status, started=started)
        await refusal.send(send)

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
