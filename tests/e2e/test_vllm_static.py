"""Static mode on the real vLLM CPU build, and what happens when vLLM dies."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from tests.conftest import edit_config
from tests.e2e.server import Reusable, find_backend, holds, make_source, tiny_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    folder = make_source(tmp_path_factory.mktemp("static"), library,
                         {"alpha": "alpha", "gamma": "gamma", "biased": "beta"})
    edit_config(folder / "biased", bias="all")
    return folder


@pytest.fixture(scope="module")
def servers(serve_factory, tiny_model, source):
    return Reusable(lambda: serve_factory(tiny_env(tiny_model, source), name="static")
                    .wait_ready())


@pytest.fixture
def server(servers):
    return servers.get()


def test_valid_adapters_found_at_start_are_served(server):
    assert server.models() == ["tiny", "alpha", "gamma"]
    answers = {server.complete(m) for m in ("tiny", "alpha", "gamma")}
    assert len(answers) == 3


def test_invalid_adapter_is_skipped_not_fatal(server):
    assert "adapter biased: skipped: bias='all' is not supported" in server.logs()
    with pytest.raises(openai.NotFoundError, match="bias='all' is not supported"):
        server.complete("biased")


def test_later_changes_are_ignored_until_restart(server, own):
    assert "static mode: NIM_PEFT_REFRESH_INTERVAL is unset" in server.logs()
    name = own.add("beta")
    holds(server.models, lambda models: name not in models, seconds=2,
          what="static mode ignores a later adapter")
    assert name not in server.models()
    with pytest.raises(openai.NotFoundError, match="static mode"):
        server.complete(name)


def test_backend_death_makes_the_entrypoint_exit_non_zero(server):
    vllm = find_backend(server.process.pid)
    os.kill(vllm, signal.SIGKILL)
    code = server.process.wait(timeout=60)
    assert code != 0
    assert "vllm exited with code -9 before it was asked to stop" in server.logs()
