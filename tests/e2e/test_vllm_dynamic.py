"""Dynamic mode on the real vLLM CPU build: copy adapters in and out while it serves."""

from __future__ import annotations

import re
import shutil
import time

import httpx
import openai
import pytest

from tests.conftest import copy_adapter, edit_config
from tests.e2e.server import alive, descendants, tiny_env

pytestmark = pytest.mark.e2e
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    folder = tmp_path_factory.mktemp("dynamic") / "loras"
    folder.mkdir()
    copy_adapter(library / "alpha", folder / "alpha")
    edit_config(copy_adapter(library / "gamma", folder / "dora"), use_dora=True)
    copy_adapter(library / "big", folder / "big")  # rank 64 > NIM_MAX_LORA_RANK=16
    return folder


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source):
    server = serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="1", NIM_MAX_LORA_RANK="16"),
        name="dynamic",
    ).wait_ready()
    TIMES["ready"] = server.ready_after
    return server


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


def test_copied_in_adapter_is_served_and_answers_differently(server, source, library):
    base, alpha = server.complete("tiny"), server.complete("alpha")
    copy_adapter(library / "beta", source / "beta")
    TIMES["copy_in_to_served"] = server.wait_for(lambda: "beta" in server.models(),
                                                 what="beta served")
    beta = server.complete("beta")
    assert beta not in (base, alpha)
    assert server.complete("tiny:beta") == beta  # <served-model>:<adapter> also works


def test_removed_adapter_disappears_and_gets_404(server, source):
    shutil.rmtree(source / "beta")
    start = time.monotonic()

    def gone() -> bool:
        try:
            server.complete("beta", tokens=1)
        except openai.NotFoundError:
            return True
        return False

    server.wait_for(gone, what="beta 404")
    TIMES["removal_to_404"] = time.monotonic() - start
    assert "beta" not in server.models()
    with pytest.raises(openai.NotFoundError, match="The model 'beta' does not exist"):
        server.complete("beta")


def test_copied_back_answers_as_before(server, source, library):
    before = server.complete("alpha")
    copy_adapter(library / "beta", source / "beta")
    server.wait_for(lambda: "beta" in server.models(), what="beta back")
    again = server.complete("beta")
    shutil.rmtree(source / "beta")
    server.wait_for(lambda: "beta" not in server.models(), what="beta removed")
    copy_adapter(library / "beta", source / "beta")
    server.wait_for(lambda: "beta" in server.models(), what="beta back again")
    assert server.complete("beta") == again
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


def test_adapter_unloaded_behind_our_back_is_loaded_again(server):
    port = re.search(r"--port (\d+)", server.logs()).group(1)
    answer = server.complete("alpha")
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/unload_lora_adapter",
                       json={"lora_name": "alpha"})
    assert reply.status_code == 200
    server.wait_for(lambda: "alpha" in httpx.get(f"http://127.0.0.1:{port}/v1/models").text,
                    what="alpha reloaded")
    assert server.complete("alpha") == answer


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
    listed = {a["name"]: a for a in server.http.get("/v1/adapters").json()["data"]}
    assert listed["alpha"]["state"] == "ready" and listed["alpha"]["ready"] is True
    assert listed["alpha"]["rank"] == 8 and listed["alpha"]["source"].endswith("/loras/alpha")
    assert listed["dora"]["state"] == "failed" and "DoRA" in listed["dora"]["reason"]
    assert listed["big"]["state"] == "failed" and listed["big"]["rank"] == 64
    assert server.http.get("/v1/adapters/alpha").json()["version"] == listed["alpha"]["version"]
    cards = {c.id: c for c in server.openai.models.list().data}
    assert cards["alpha"].root == listed["alpha"]["source"]  # the folder, not a snapshot
    assert cards["alpha"].parent == "tiny"


def running_in_vllm(server) -> float:
    for line in server.http.get("/v1/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vLLM's metrics are not appended")


def test_metrics_have_ours_and_vllms(server):
    text = server.http.get("/v1/metrics").text
    assert 'lora_adapters{state="ready"}' in text
    assert 'lora_adapter_loads_total{kind="loaded"}' in text
    assert 'lora_adapter_failures_total{reason="invalid"} 2.0' in text
    assert 'lora_requests_total{adapter="alpha"}' in text
    assert "lora_adapter_load_seconds_bucket" in text and "lora_scan_seconds_count" in text
    assert running_in_vllm(server) == 0


def test_a_client_that_goes_away_cancels_the_generation(server):
    stream = server.openai.completions.create(model="alpha", prompt="Hello", max_tokens=400,
                                              temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
    next(iter(stream))
    server.wait_for(lambda: running_in_vllm(server) == 1, timeout=5, what="vLLM generating")
    stream.close()  # the client disconnects after the first chunk
    server.wait_for(lambda: running_in_vllm(server) == 0, timeout=5,
                    what="vLLM stopped generating")


def test_sigterm_stops_everything(server):
    children = descendants(server.process.pid)
    assert children, "the backend runs as a child of the entrypoint"
    start = time.monotonic()
    code = server.terminate(timeout=30)
    TIMES["sigterm_to_exit"] = time.monotonic() - start
    assert code == 0
    time.sleep(0.5)
    left = [pid for pid in children if alive(pid)]
    assert not left, f"processes left behind: {left}"
    print("measured:", {k: round(v, 2) for k, v in TIMES.items()})
