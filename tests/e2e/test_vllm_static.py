"""Static mode on the real vLLM CPU build, and what happens when vLLM dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import copy_adapter, edit_config
from tests.e2e.server import children_of, tiny_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    folder = tmp_path_factory.mktemp("static") / "loras"
    folder.mkdir()
    copy_adapter(library / "alpha", folder / "alpha")
    copy_adapter(library / "gamma", folder / "gamma")
    edit_config(copy_adapter(library / "beta", folder / "biased"), bias="all")
    return folder


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source):
    return serve_factory(
        tiny_env(tiny_model, source),
        name="static",
    ).wait_ready()


def test_valid_adapters_found_at_start_are_served(server):
    assert server.models() == ["tiny", "alpha", "gamma"]
    answers = {server.complete(m) for m in ("tiny", "alpha", "gamma")}
    assert len(answers) == 3


def test_invalid_adapter_is_skipped_not_fatal(server):
    assert "adapter biased: skipped: bias='all' is not supported" in server.logs()
    with pytest.raises(openai.NotFoundError, match="bias='all' is not supported"):
        server.complete("biased")


def test_later_changes_are_ignored_until_restart(server, source, library):
    assert "static mode: NIM_PEFT_REFRESH_INTERVAL is unset" in server.logs()
    copy_adapter(library / "beta", source / "beta")
    time.sleep(2)
    assert "beta" not in server.models()
    with pytest.raises(openai.NotFoundError, match="static mode"):
        server.complete("beta")


def test_backend_death_makes_the_entrypoint_exit_non_zero(server):
    vllm = _find_backend(server.process.pid)
    os.kill(vllm, signal.SIGKILL)
    code = server.process.wait(timeout=60)
    assert code != 0
    assert "vllm exited with code -9 before it was asked to stop" in server.logs()


def _find_backend(parent: int) -> int:
    for pid in children_of(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmdline:
            return pid
    raise AssertionError("no vLLM child process found")
