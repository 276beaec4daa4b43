"""Upstream: the gateway's HTTP client to the backend's OpenAI routes.

aiohttp, not httpx, on this hot path: measured on 2 cores against a fast stand-in, httpx's pool
cost 1.2 ms per request and collapsed under 32 concurrent clients (5% of direct throughput), which
is the cost the benchmark in `benchmarks/gateway.py` exists to keep small. Admin calls (load,
unload) stay on httpx in the backend modules. Forwards bytes; knows nothing of adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import aiohttp
from multidict import CIMultiDict

KEEPALIVE_SECS = 4.0
Timeout = (aiohttp.ServerTimeoutError, TimeoutError)
#: errors that mean the backend did not answer properly
UpstreamError = aiohttp.ClientError
ClientResponse = aiohttp.ClientResponse


class Upstream:
    """Pooled keep-alive connections to one backend; the session opens on first use."""

    def __init__(self, base_url: str, *, read_timeout: float = 600.0, connect_timeout: float = 5.0,
                 headers: Mapping[str, str] | None = None, uds: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.uds = uds  # the backend's Unix socket (None: TCP to `base_url`)
        self.headers = dict(headers or {})  # sent with every request (the backend's API key)
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                             sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # Idle connections are dropped before the backend's own keep-alive timeout
                # (uvicorn's 5 s in vLLM and SGLang): reusing one it has just closed answered
                # a burst of clients with 502s (benchmarks/gateway.py, 32 streams).
                connector=aiohttp.UnixConnector(self.uds, limit=0,
                                                keepalive_timeout=KEEPALIVE_SECS)
                if self.uds else aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECS),
                timeout=self.timeout,
                auto_decompress=False,
                headers=self.headers,
                skip_auto_headers=("Accept-Encoding", "User-Agent"),
            )
        return self._session

    async def send(self, method: str, path: str, *,
                   headers: Iterable[tuple[str, str]] | None = None,
                   body: bytes | None = None, query: str = "") -> aiohttp.ClientResponse:
        """Send a request; the caller reads (or streams) and releases the response."""
        url = self.base_url + path + (f"?{query}" if query else "")
        sent = None if headers is None else CIMultiDict(headers)  # (repeats kept, in order)
        try:
            return await self.session.request(method, url, headers=sent, data=body)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A pooled connection the backend closed as we reused it (its keep-alive timer, late
            # on a starved event loop): the request never reached it. Once more, on a new one.
            return await self.session.request(method, url, headers=sent, data=body)

    async def get(self, path: str, *, timeout: float | None = None) -> tuple[int, bytes]:
        """A small GET: status and whole body."""
        limit = aiohttp.ClientTimeout(total=timeout) if timeout else None
        async with self.session.get(self.base_url + path, timeout=limit) as response:
            return response.status, await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
