"""End-to-end fixtures: start `lora-entrypoint serve` as a user would."""

from __future__ import annotations

import pytest

from tests.e2e.server import Own, Server, descendants, free_port

__all__ = ["Server", "descendants", "free_port"]


@pytest.fixture(scope="module")
def serve_factory(tmp_path_factory):
    servers: list[Server] = []

    def start(env: dict[str, str], name: str = "serve", command: list[str] | None = None) -> Server:
        log = tmp_path_factory.mktemp(name) / "serve.log"
        server = Server(env, log, command).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.terminate()


@pytest.fixture
def own(request, library, source, server):
    """This test's own adapters in the module's `source` (served by its `server`): named after
    the test, removed after it, so the module's tests run alone or in any order."""
    adapters = Own(request.node.name, source, library, server)
    yield adapters
    adapters.cleanup()
