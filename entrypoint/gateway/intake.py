"""A request's body read off the ASGI connection, under a size limit.

Reads bytes only: what the body says is `bodies`' business, where it goes `routing`'s.
"""

from __future__ import annotations

from starlette.types import Receive, Scope

from entrypoint.gateway.errors import Refusal

MAX_BODY_BYTES = 32 << 20
TOO_LARGE = Refusal(413, f"Request body over {MAX_BODY_BYTES >> 20} MiB.", "BadRequestError")


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
