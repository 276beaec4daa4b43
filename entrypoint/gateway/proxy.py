"""Forwarding one request to the backend and relaying its answer, chunk by chunk as it comes.

It sends the bytes it is given and streams back what the backend says; it never routes, never
reads or rewrites a request body, and counts nothing itself (`done(status)` tells the caller how
it ended).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from entrypoint.gateway.errors import send_error
from entrypoint.gateway.state import GatewayState
from entrypoint.gateway.upstream import ClientResponse, Timeout, UpstreamError

log = logging.getLogger(__name__)

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


class Proxy:
    """Forwards requests over `state.client` (read at each request: the service sets it)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def forward(
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
