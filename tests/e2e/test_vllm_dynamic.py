"""Dynamic mode on the real vLLM CPU build: copy adapters in and out while it serves."""

from __future__ import annotations

import re
import shutil
import time

import openai
import pytest

from tests.conftest import edit_config
from tests.e2e.server import Reusable, descendants, make_source, tiny_env, wait_gone

pytestmark = pytest.mark.e2e
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    # big: rank 64 > NIM_MAX_LORA_RANK=16
    folder = make_source(tmp_path_factory.mktemp("dynamic"), library,
                         {"alpha": "alpha", "dora": "gamma", "big": "big"})
    edit_config(folder / "dora", use_dora=True)
    return folder


@pytest.fixture(scope="module")
def servers(serve_factory, tiny_model, source):
    def start():
        server = serve_factory(
            tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="1", NIM_MAX_LORA_RANK="16"),
            name="dynamic",
        ).wait_ready()
        TIMES["ready"] = server.ready_after
        return server

    return Reusable(start)


@pytest.fixture
def server(servers):
    return servers.get()


def test_adapters_present_at_start_are_served(server):
    assert server.models() == ["tiny", "alpha"]
    assert server.complete("alpha") != server.complete("tiny")


def test_invalid_adapters_are_skipped_with_a_reason(server):
    logs = server.logs()
    assert re.search(r"adapter dora: skipped: DoRA adapters .* are not supported", logs)
    assert re.search(r"adapter big: skipped: rank 64 is above NIM_MAX_LORA_RANK=16", logs)
    with pytest.raises(openai.NotFoundError) as info:
        server.complete("big")
    assert "rank 64 is above NIM_MAX_LORA_RANK=16" in str(info.value)
    assert server.complete("alpha")  # the others are unaffected


def test_copied_in_adapter_is_served_and_answers_differently(server, own):
    base, alpha = server.complete("tiny"), server.complete("alpha")
    name = own.add("beta")
    TIMES["copy_in_to_served"] = server.wait_for(lambda: name in server.models(),
                                                 what=f"{name} served")
    beta = server.complete(name)
    assert beta not in (base, alpha)
    assert server.complete(f"tiny:{name}") == beta  # <served-model>:<adapter> also works


def test_removed_adapter_disappears_and_gets_404(server, own):
    name = own.add("beta")
    server.wait_for(lambda: name in server.models(), what=f"{name} served")
    shutil.rmtree(own.path())
    start = time.monotonic()

    def gone() -> bool:
        try:
            server.complete(name, tokens=1)
        except openai.NotFoundError:
            return True
        return False

    server.wait_for(gone, what=f"{name} 404")
    TIMES["removal_to_404"] = time.monotonic() - start
    assert name not in server.models()
    with pytest.raises(openai.NotFoundError, match=f"The model '{name}' does not exist"):
        server.complete(name)


def test_copied_back_answers_as_before(server, own):
    before = server.complete("alpha")
    name = own.add("beta")
    server.wait_for(lambda: name in server.models(), what=f"{name} back")
    again = server.complete(name)
    shutil.rmtree(own.path())
    server.wait_for(lambda: name not in server.models(), what=f"{name} removed")
    own.add("beta")
    server.wait_for(lambda: name in server.models(), what=f"{name} back again")
    assert server.complete(name) == again
    assert server.complete("alpha") == before


def test_chat_and_streaming_through_the_public_port(server):
    chat = server.openai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content
    whole = server.complete("alpha", tokens=10)
    chunks = list(server.openai.completions.create(
        model="alpha", prompt="Hello world", max_tokens=10, temperature=0, seed=0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_adapter_unloaded_behind_our_back_is_loaded_again(server, own):
    backend = server.backend()
    name = own.add("alpha")
    server.wait_served(name)
    answer = server.complete(name)
    reply = backend.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert reply.status_code == 200

    def in_vllm() -> set[str]:
        return {m["id"] for m in backend.get("/v1/models").json()["data"]}

    server.wait_for(lambda: name in in_vllm(), what=f"{name} reloaded")
    assert server.complete(name) == answer


def test_metadata_reports_profile_and_backend(server):
    meta = server.http.get("/v1/metadata").json()
    assert meta["profile"]["name"] == "vllm-cpu-bf16-tp1-pp1-feat_lora"
    assert len(meta["profile"]["id"]) == 64
    assert meta["selectedModelProfileId"] == meta["profile"]["id"]
    assert meta["backend"]["name"] == "vllm" and meta["backend"]["version"].startswith("0.")
    assert meta["modelInfo"][0]["shortName"] == "tiny"
    assert server.http.get("/v1/version").json()["release"]
    assert server.http.get("/v1/load_lora_adapter").status_code == 404  # admin stays private


def test_adapters_endpoint_tells_the_truth(server):
    listed = server.adapters()
    assert listed["alpha"]["state"] == "ready" and listed["alpha"]["ready"] is True
    assert listed["alpha"]["rank"] == 8 and listed["alpha"]["source"].endswith("/loras/alpha")
    assert listed["dora"]["state"] == "failed" and "DoRA" in listed["dora"]["reason"]
    assert listed["big"]["state"] == "failed" and listed["big"]["rank"] == 64
    assert server.http.get("/v1/adapters/alpha").json()["version"] == listed["alpha"]["version"]
    cards = {c.id: c for c in server.openai.models.list().data}
    assert cards["alpha"].root == listed["alpha"]["source"]  # the folder, not a snapshot
    assert cards["alpha"].parent == "tiny"


def running_in_vllm(server) -> float:
    return server.metric("vllm:num_requests_running")


def test_metrics_have_ours_and_vllms(server):
    assert server.complete("alpha")  # a request of its own to count
    text = server.http.get("/v1/metrics").text
    assert 'lora_adapters{state="ready"}' in text
    assert 'lora_adapter_loads_total{kind="loaded"}' in text
    assert 'lora_adapter_failures_total{reason="invalid"} 2.0' in text
    assert 'lora_requests_total{adapter="alpha"}' in text
    assert "lora_adapter_load_seconds_bucket" in text and "lora_scan_seconds_count" in text
    assert running_in_vllm(server) == 0


def test_a_client_that_goes_away_cancels_the_generation(server):
    """Judged by the tokens vLLM generated, not by sampling its running gauge (a whole
    generation can take about a second here, shorter than a poll may need to see it)."""
    generated = "vllm:generation_tokens_total"
    before = server.metric(generated)
    stream = server.openai.completions.create(model="alpha", prompt="Hello", max_tokens=400,
                                              temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client disconnects after the first chunk
    # Settled: nothing running, and no token generated for a whole second.
    last, deadline = -1.0, time.monotonic() + 30
    while (now := server.metric(generated)) != last or running_in_vllm(server):
        assert time.monotonic() < deadline, "vLLM did not settle"
        last = now
        time.sleep(1.0)
    assert now - before < 400, "the generation ran to its end"


def test_sigterm_stops_everything(server):
    children = descendants(server.process.pid)
    assert children, "the backend runs as a child of the entrypoint"
    start = time.monotonic()
    code = server.terminate(timeout=30)
    TIMES["sigterm_to_exit"] = time.monotonic() - start
    assert code == 0
    wait_gone(children)
    print("measured:", {k: round(v, 2) for k, v in TIMES.items()})
