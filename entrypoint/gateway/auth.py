"""Bearer-key checks on the public port, in front of every route but probes and scrapers.

Pure ASGI middleware: it lets a request through or answers 401; it never reads a body or
routes.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from entrypoint.gateway.errors import openai_error

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
