"""Net: the sockets, servers and clients the service speaks through, and the loop it runs on.

The public port's listening socket (bound before the backend starts), the uvicorn server on it,
the two clients to the backend, a free loopback port. Knows nothing of adapters or of the
service's life: it opens what it is asked to and leaves closing to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import uvicorn

from entrypoint.config.settings import ConfigError
from entrypoint.gateway.http import HeaderDeadlineProtocol
from entrypoint.gateway.upstream import Upstream
from entrypoint.runtime.launch import LaunchPlan

#: how the public port's server runs (the gateway benchmark uses the same)
GATEWAY_SERVER_OPTIONS: dict[str, Any] = {
    "log_config": None, "access_log": False, "lifespan": "off", "timeout_graceful_shutdown": 5,
    "http": HeaderDeadlineProtocol, "interface": "asgi3"}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for the backend, when none is given)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listen(host: str, port: int) -> socket.socket:
    """The public socket, bound before the backend starts so a busy port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it a response written as headers, then body,
    # waits for the client's delayed ACK (40 ms per request on keep-alive connections).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"NIM_SERVER_PORT={port}: cannot listen on {host}:{port} ({exc.strerror}); "
            "choose a free port"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def proxy_client(base_url: str, *, headers: dict[str, str] | None = None,
                 uds: str | None = None) -> Upstream:
    """The gateway's client to the backend: pooled keep-alive connections, long reads."""
    return Upstream(base_url, read_timeout=600.0, connect_timeout=5.0, headers=headers, uds=uds)


def admin_client(plan: LaunchPlan, timeout: float) -> httpx.AsyncClient:
    """The entrypoint's own client to the backend (probes, lists, loads, unloads)."""
    return httpx.AsyncClient(
        base_url=plan.backend_url, headers=backend_headers(plan),
        transport=httpx.AsyncHTTPTransport(uds=plan.uds) if plan.uds else None,
        timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


def backend_headers(plan: LaunchPlan) -> dict[str, str]:
    """Headers for every call to the backend: its key, when it requires one."""
    return {"Authorization": f"Bearer {plan.backend_key}"} if plan.backend_key else {}


def run_event_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop where it is installed (the public port's cost per request and per
    streamed chunk: benchmarks/gateway.py), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


__all__ = ["GATEWAY_SERVER_OPTIONS", "GatewayServer", "admin_client", "backend_headers",
           "free_port", "listen", "proxy_client", "run_event_loop"]
