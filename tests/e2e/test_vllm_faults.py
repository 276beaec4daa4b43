"""Fault injection with the real vLLM: the backend answering 500 or timing out (through a shim),
refusals, and one adapter's trouble never delaying another."""

from __future__ import annotations

import re
import sys
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import copy_adapter
from tests.e2e.server import free_port, tiny_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    folder = tmp_path_factory.mktemp("faults") / "loras"
    folder.mkdir()
    copy_adapter(library / "alpha", folder / "alpha")
    return folder


@pytest.fixture(scope="module")
def shim_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source, shim_port):
    return serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="1", NIM_MAX_LORA_RANK="16",
                 NIM_PEFT_API_TIMEOUT_SECS="1", SHIM_PORT=str(shim_port)),
        name="faults",
        command=[sys.executable, "-m", "tests.e2e.shim_serve"],
    ).wait_ready()


@pytest.fixture
def shim(server, shim_port):
    class Shim:
        url = f"http://127.0.0.1:{shim_port}"

        def fail(self, path: str, *, times: int, status: int | None = None, delay: float = 0,
                 lora_name: str | None = None) -> None:
            httpx.post(self.url + "/__faults", json={"path": path, "times": times,
                                                     "status": status, "delay": delay,
                                                     "lora_name": lora_name}).raise_for_status()

        def calls(self, path: str, name: str) -> list[dict]:
            return [c for c in httpx.get(self.url + "/__calls").json()
                    if c["path"] == path and c["lora_name"] == name]

    return Shim()


LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


def test_500s_are_retried_with_backoff_until_served(server, shim, source, library):
    shim.fail(LOAD, times=3, status=500, lora_name="beta")
    copy_adapter(library / "beta", source / "beta")
    server.wait_for(lambda: server.error_of("beta") is None, timeout=30, what="beta served")
    calls = shim.calls(LOAD, "beta")
    assert [c.get("status") for c in calls] == [500, 500, 500, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9 and gaps[2] >= 1.9, gaps  # 0.5, 1, 2 s backoff
    assert len(re.findall(r"adapter beta: backend not answering .* retry \d", server.logs())) == 3
    assert server.complete("beta") != server.complete("alpha")


def test_a_timeout_is_retried(server, shim, source, library):
    shim.fail(LOAD, times=1, delay=3, lora_name="gamma")
    copy_adapter(library / "gamma", source / "gamma")
    time.sleep(1.5)
    assert "load will be retried" in server.error_of("gamma")
    server.wait_for(lambda: server.error_of("gamma") is None, timeout=30, what="gamma served")
    assert "ReadTimeout" in server.logs()


def test_one_failing_adapter_never_delays_another(server, shim, source, library):
    shim.fail(LOAD, times=50, delay=0.9, status=503, lora_name="stuck")
    copy_adapter(library / "alpha", source / "stuck")
    time.sleep(0.3)
    start = time.monotonic()
    copy_adapter(library / "beta", source / "fresh")
    server.wait_for(lambda: server.error_of("fresh") is None, timeout=10, what="fresh served")
    assert time.monotonic() - start < 2.0
    stuck = server.error_of("stuck")
    assert "still loading" in stuck or "load will be retried" in stuck, stuck


def test_refused_adapter_fails_once_and_is_not_retried(server, shim, source, library):
    folder = copy_adapter(library / "alpha", source / "liar")
    weights = folder / "adapter_model.safetensors"
    good = weights.read_bytes()
    tensors = load_file(weights)  # tensors for a module the model does not have
    save_file({k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()}, weights)
    server.wait_for(lambda: "failed to load" in (server.error_of("liar") or ""), timeout=10,
                    what="liar failed")
    assert "refused by the backend" in server.error_of("liar")
    time.sleep(3)  # three more passes
    assert len(shim.calls(LOAD, "liar")) == 1
    weights.write_bytes(good)  # fixed: its files changed, so it is tried again
    server.wait_for(lambda: server.error_of("liar") is None, timeout=10, what="liar served")


def test_unload_failure_still_refuses_requests_and_retries(server, shim, source):
    import shutil

    shim.fail(UNLOAD, times=2, status=500, lora_name="fresh")
    shutil.rmtree(source / "fresh")
    server.wait_for(lambda: server.error_of("fresh") is not None, timeout=5, what="fresh 404")
    server.wait_for(lambda: len(shim.calls(UNLOAD, "fresh")) >= 3, timeout=15,
                    what="unload retried")
    server.wait_for(lambda: "fresh" not in server.models(), timeout=5, what="fresh gone")
    assert "does not exist" in server.error_of("fresh")


def test_folder_deleted_mid_load_ends_unserved_and_harmless(server, shim, source, library):
    import shutil

    shim.fail(LOAD, times=1, delay=1.5, lora_name="vanish")  # the load hangs for a while
    copy_adapter(library / "gamma", source / "vanish")
    server.wait_for(lambda: len(shim.calls(LOAD, "vanish")) == 1, timeout=5,
                    what="load started")
    shutil.rmtree(source / "vanish")  # the folder goes while vLLM is loading it
    server.wait_for(lambda: "does not exist" in (server.error_of("vanish") or ""), timeout=15,
                    what="vanish gone")
    time.sleep(2.5)  # passes after the load ended unload what it left behind
    assert "vanish" not in server.models()
    assert "does not exist" in server.error_of("vanish")
    assert server.complete("alpha")
