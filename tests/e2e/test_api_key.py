"""An API key (VLLM_API_KEY, or --api-key in NIM_PASSTHROUGH_ARGS) protects the public port as it
protects the backend's, and never locks the entrypoint itself out: adapters still load."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.conftest import copy_adapter
from tests.e2e.server import make_source, sglang_env, tiny_env

pytestmark = pytest.mark.e2e
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def check_protected(server, adapter: str) -> None:
    """What a user of the key and a user without it see."""
    server.wait_served(adapter, headers=AUTH)
    keyed = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in keyed.models.list().data} >= {"tiny", adapter}
    answer = keyed.completions.create(model=adapter, prompt="Hi", max_tokens=4, temperature=0)
    assert answer.choices[0].text
    for wrong in ("none", KEY + "x"):
        stranger = openai.OpenAI(base_url=server.url + "/v1", api_key=wrong, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
        with pytest.raises(openai.AuthenticationError):
            stranger.completions.create(model=adapter, prompt="Hi", max_tokens=4)
    assert server.http.get("/v1/adapters").status_code == 401
    for open_route in ("/v1/health/live", "/v1/health/ready"):
        assert server.http.get(open_route).status_code == 200  # probes send no key
    # No call of ours was refused (a random port may contain "401": match answers only).
    assert not re.search(r"HTTP 401\b|status=401\b", _entrypoint_lines(server))


def _entrypoint_lines(server) -> str:
    return "\n".join(line for line in server.logs().splitlines() if " entrypoint" in line)


@pytest.fixture
def source(tmp_path, library):
    """Each test's own folder (and server): no adapter name is shared between the tests."""
    return make_source(tmp_path, library, {"key-a": "alpha"})


def test_vllm_api_key_protects_the_port_and_adapters_load(serve_factory, tiny_model, source,
                                                            library):
    server = serve_factory(tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="60",
                                    VLLM_API_KEY=KEY), name="vllm-key").wait_ready()
    check_protected(server, "key-a")
    copy_adapter(library / "beta", source / "key-b")  # hot reload works with the key too
    check_protected(server, "key-b")
    assert KEY not in server.logs()
    server.terminate()


def test_sglang_api_key_flag_protects_the_port(serve_factory, tmp_path, tiny_model, source):
    env = sglang_env(tmp_path, tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="30",
                     NIM_PASSTHROUGH_ARGS=f"--api-key {KEY}")
    server = serve_factory(env, name="sglang-key").wait_ready(timeout=60)
    check_protected(server, "key-a")
    assert "--api-key ***" in server.logs() and KEY not in server.logs()
    # the backend itself wants the key: the entrypoint's own calls carry it
    port = server.backend_port()
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    server.terminate()
