"""Fault injection with the real vLLM: the backend answering 500 or timing out (through a shim),
refusals, and one adapter's trouble never delaying another."""

from __future__ import annotations

import re
import shutil
import sys
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.e2e.server import free_port, holds, make_source, tiny_env, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    return make_source(tmp_path_factory.mktemp("faults"), library, {"alpha": "alpha"})


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


def test_500s_are_retried_with_backoff_until_served(server, shim, own):
    name = own.name()
    shim.fail(LOAD, times=3, status=500, lora_name=name)
    own.add("beta")
    server.wait_for(lambda: server.error_of(name) is None, timeout=30, what=f"{name} served")
    calls = shim.calls(LOAD, name)
    assert [c.get("status") for c in calls] == [500, 500, 500, 200]
    gaps = [b["time"] - a["time"] for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9 and gaps[2] >= 1.9, gaps  # 0.5, 1, 2 s backoff
    retries = re.findall(rf"adapter {re.escape(name)}: backend not answering .* retry \d",
                         server.logs())
    assert len(retries) == 3
    assert server.complete(name) != server.complete("alpha")


def test_a_timeout_is_retried(server, shim, own):
    name = own.name()
    shim.fail(LOAD, times=1, delay=3, lora_name=name)
    own.add("gamma")
    wait_until(lambda: server.error_of(name) or "", lambda error: "load will be retried" in error,
               timeout=10, what=f"{name} refused while its load is retried")
    server.wait_for(lambda: server.error_of(name) is None, timeout=30, what=f"{name} served")
    assert "ReadTimeout" in server.logs()


def test_one_failing_adapter_never_delays_another(server, shim, own):
    stuck, fresh = own.name("stuck"), own.name("fresh")
    shim.fail(LOAD, times=50, delay=0.9, status=503, lora_name=stuck)
    own.add("alpha", "stuck")
    server.wait_for(lambda: shim.calls(LOAD, stuck), timeout=10, what=f"{stuck} loading")
    start = time.monotonic()
    own.add("beta", "fresh")
    server.wait_for(lambda: server.error_of(fresh) is None, timeout=10, what=f"{fresh} served")
    assert time.monotonic() - start < 2.0
    error = server.error_of(stuck)
    assert "still loading" in error or "load will be retried" in error, error


def test_refused_adapter_fails_once_and_is_not_retried(server, shim, own):
    name = own.add("alpha")
    weights = own.path() / "adapter_model.safetensors"
    good = weights.read_bytes()
    tensors = load_file(weights)  # tensors for a module the model does not have
    save_file({k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()}, weights)
    server.wait_for(lambda: "failed to load" in (server.error_of(name) or ""), timeout=10,
                    what=f"{name} failed")
    assert "refused by the backend" in server.error_of(name)
    holds(lambda: len(shim.calls(LOAD, name)), lambda loads: loads == 1, seconds=3,
          what=f"{name} not loaded again (three more passes)")
    weights.write_bytes(good)  # fixed: its files changed, so it is tried again
    server.wait_for(lambda: server.error_of(name) is None, timeout=10, what=f"{name} served")


def test_unload_failure_still_refuses_requests_and_retries(server, shim, own):
    name = own.add("beta")
    server.wait_for(lambda: server.error_of(name) is None, timeout=10, what=f"{name} served")
    shim.fail(UNLOAD, times=2, status=500, lora_name=name)
    shutil.rmtree(own.path())
    server.wait_for(lambda: server.error_of(name) is not None, timeout=5, what=f"{name} 404")
    server.wait_for(lambda: len(shim.calls(UNLOAD, name)) >= 3, timeout=15,
                    what="unload retried")
    server.wait_for(lambda: name not in server.models(), timeout=5, what=f"{name} gone")
    assert "does not exist" in server.error_of(name)


def test_folder_deleted_mid_load_ends_unserved_and_harmless(server, shim, own):
    name = own.name()
    shim.fail(LOAD, times=1, delay=1.5, lora_name=name)  # the load hangs for a while
    own.add("gamma")
    server.wait_for(lambda: len(shim.calls(LOAD, name)) == 1, timeout=5,
                    what="load started")
    shutil.rmtree(own.path())  # the folder goes while vLLM is loading it
    server.wait_for(lambda: "does not exist" in (server.error_of(name) or ""), timeout=15,
                    what=f"{name} gone")
    # the hung load ends in this window; passes after it unload what it left behind, and the
    # adapter is never served meanwhile
    holds(server.models, lambda models: name not in models, seconds=2.5,
          what=f"{name} never served after its folder went")
    assert name not in server.models()
    assert "does not exist" in server.error_of(name)
    assert server.complete("alpha")


def test_a_retry_vllm_no_longer_needs_settles(server, shim, own):
    """vLLM loses an adapter, the loads that give it back fail, and it gets it back anyway (as a
    load that timed out lands late): the record settles, never "will be retried" for ever with
    no retry to come (the chaos run waited 90 s for it)."""
    name = own.add("beta")
    server.wait_served(name)
    vllm = server.backend()
    path = next(card["root"] for card in vllm.get("/v1/models").json()["data"]
                if card["id"] == name)
    before = len(shim.calls(LOAD, name))
    shim.fail(LOAD, times=3, status=500, lora_name=name)
    vllm.post(UNLOAD, json={"lora_name": name}).raise_for_status()
    wait_until(lambda: [c.get("status") for c in shim.calls(LOAD, name)[before:]],
               lambda statuses: statuses == [500, 500, 500], timeout=15,
               what=f"three failed loads of {name}")
    # its next retry is 2 s away; the load lands meanwhile, not through the service
    vllm.post(LOAD, json={"lora_name": name, "lora_path": path}).raise_for_status()
    server.wait_adapters(lambda adapters: adapters[name]["state"] == "ready"
                         and not adapters[name]["reason"], timeout=10,
                         what=f"{name} settled", only=[name])
    assert len(shim.calls(LOAD, name)) == before + 3  # nothing loaded again: vLLM had it
    assert name in server.models() and server.error_of(name) is None
