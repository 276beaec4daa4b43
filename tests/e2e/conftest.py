"""End-to-end fixtures: start `lora-entrypoint serve` as a user would."""

from __future__ import annotations

import pytest

from tests.e2e.server import Own, Server, descendants, free_port

__all__ = ["Server", "descendants", "free_port"]


#: the modules that take longest (minutes each, in that order when measured), run first:
#: `make test` runs the modules that are not `timing` in two processes (pytest-xdist, --dist
#: loadfile), which take them in collection order, so that both processes end about together
SLOWEST_FIRST = ("test_vllm_first_request.py", "test_vllm_chaos.py", "test_vllm_runtime_api.py",
                 "test_demo.py", "test_vllm_list_source.py", "test_s3_source.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: per module)


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
