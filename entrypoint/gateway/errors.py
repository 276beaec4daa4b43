"""OpenAI error answers: the body, as a Starlette response or sent in plain ASGI, and `Refusal`,
a request answered here with one.

Builds and sends answers; decides nothing about a request (that is `routing`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.responses import JSONResponse, Response
from starlette.types import Send


def error_body(status: int, message: str, kind: str, code: str | int | None = None) -> dict:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code or status}}


def openai_error(status: int, message: str, kind: str, code: str | int | None = None) -> Response:
    """An OpenAI error answer as a Starlette response."""
    return JSONResponse(error_body(status, message, kind, code), status_code=status)


async def send_error(send: Send, status: int, message: str, kind: str,
                     code: str | int | None = None) -> None:
    """An OpenAI error answer, sent in plain ASGI."""
    body = json.dumps(error_body(status, message, kind, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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

    async def send(self, send: Send) -> None:
        """The answer, sent in plain ASGI."""
        await send_error(send, self.status, self.message, self.kind, self.code)


STARTING = Refusal(503, "The model is still starting.", "ServiceUnavailable")
