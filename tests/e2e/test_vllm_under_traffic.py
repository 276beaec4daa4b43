"""Removing and swapping adapters under traffic never pulls files from under vLLM.

With one adapter slot and one adapter in vLLM's host cache, every switch between two adapters
evicts one and reads the other from its path again. An adapter removed (or swapped) while its
requests were running used to have its snapshot deleted at once; vLLM then read the deleted path,
its engine died and every request failed. Removal now closes the name, drains, unloads, and keeps
the files for a grace period; swaps keep the old snapshot the same way.
"""

from __future__ import annotations

import shutil
import threading
import time

import openai
import pytest

from tests.e2e.server import make_source, tiny_env

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    return make_source(tmp_path_factory.mktemp("traffic"), library,
                       {"busy-x": "alpha", "busy-y": "beta"})


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source):
    return serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="120", NIM_MAX_LORA_RANK="16",
                 NIM_MAX_GPU_LORAS="1", NIM_MAX_CPU_LORAS="1", NIM_SNAPSHOT_GRACE_SECS="3"),
        name="traffic",
    ).wait_ready()


class Clients:
    """Threads that keep streaming long answers from some models until stopped."""

    def __init__(self, server, models: list[str], per_model: int = 2) -> None:
        self.server = server
        self.stop = threading.Event()
        self.results: list[tuple[str, str]] = []  # (model, "ok" | "404" | error text)
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True)
                        for m in models for _ in range(per_model)]

    def _run(self, model: str) -> None:
        client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        while not self.stop.is_set():
            try:
                stream = client.completions.create(model=model, prompt="Once upon a time",
                                                   max_tokens=120, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True})
                for _ in stream:
                    pass
                self.results.append((model, "ok"))
            except openai.NotFoundError:
                self.results.append((model, "404"))
                time.sleep(0.05)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.results.append((model, f"{type(exc).__name__}: {exc}"))
                time.sleep(0.2)

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def test_swaps_and_removal_under_traffic_keep_the_engine_alive(server, source, library):
    weights = {name: (library / name / "adapter_model.safetensors").read_bytes()
               for name in ("alpha", "gamma")}
    # One client per model: with one adapter slot, vLLM's scheduler skips a waiting request
    # for another adapter while the slot's adapter has one running, so two busy-y clients
    # streaming in turn kept busy-x waiting for minutes once a swap's drain had given busy-y
    # the slot (seen once in a full run); one client leaves a gap after each stream.
    with Clients(server, ["busy-x", "busy-y", "tiny"], per_model=1) as clients:
        server.wait_for(lambda: server.metric("vllm:num_requests_running") >= 1, timeout=30,
                        what="streams in flight")
        for i in range(4):  # swap busy-x's weights back and forth while it streams
            target = source / "busy-x" / "adapter_model.safetensors"
            tmp = target.with_name(".swap")
            tmp.write_bytes(weights["gamma" if i % 2 == 0 else "alpha"])
            tmp.replace(target)
            time.sleep(1.5)  # part of the scenario: streams run across each swap
        shutil.rmtree(source / "busy-x")  # removed with requests in flight
        server.wait_for(lambda: server.error_of("busy-x") is not None, timeout=60,
                        what="busy-x closed")
        # past the grace period its snapshots go; the others' streams go on after that
        server.wait_for(lambda: not any(name.startswith("busy-x")
                                        for name in server.snapshots()),
                        timeout=60, what="busy-x's snapshots deleted")
        done = len(clients.results)
        server.wait_for(lambda: {m for m, r in clients.results[done:] if r == "ok"}
                        >= {"busy-y", "tiny"}, timeout=120, what="streams after the deletion")
    assert server.process.poll() is None, server.logs()[-3000:]
    failures = [r for r in clients.results if r[1] not in ("ok", "404")]
    assert not failures, failures[:5]
    assert [m for m, r in clients.results if r == "404"] == [m for m, r in clients.results
                                                               if r == "404" and m == "busy-x"]
    assert sum(1 for m, r in clients.results if m == "busy-x" and r == "ok") >= 2
    assert server.complete("busy-y") and server.complete("tiny")
    logs = server.logs()
    assert "FileNotFoundError" not in logs and "died" not in logs and "Traceback" not in logs
    assert not any(name.startswith("busy-x") for name in server.snapshots())


def test_clients_that_hang_up_on_plain_requests_leave_vllm_idle(server):
    """Only streams used to watch for the client going away: 8 non-streamed requests (n 8,
    480 tokens) whose clients left kept vLLM generating 16.8 s after."""
    import httpx

    body = {"model": "busy-y", "prompt": "Tell me a long story", "max_tokens": 480, "n": 8,
            "temperature": 1.0, "ignore_eos": True}

    def hang_up() -> None:
        try:
            httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
        except httpx.TimeoutException:
            return  # the client leaves
        raise AssertionError("a 480-token answer came within 1.5 s")

    threads = [threading.Thread(target=hang_up) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    left = time.monotonic()
    server.wait_for(lambda: server.metric("vllm:num_requests_running") == 0
                    and server.metric("vllm:num_requests_waiting") == 0, timeout=60,
                    what="vLLM idle after its clients left")
    idle_after = time.monotonic() - left
    assert idle_after < 5, f"vLLM kept generating {idle_after:.1f} s after its clients left"
