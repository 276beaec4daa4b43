"""The walking skeleton's scenarios on SGLang (its test double), through the CLI, with an SGLang
profile on a machine whose GPU inventory is simulated (a fake nvidia-smi reporting one H100)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import copy_adapter, edit_config
from tests.e2e.server import (
    BIN,
    SGLANG_PROFILE,
    Reusable,
    clean_env,
    descendants,
    holds,
    make_source,
    sglang_env,
    wait_gone,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)
PROFILE = SGLANG_PROFILE


def seen_by_sglang(tmp: Path, path: str = "/v1/completions") -> list[dict]:
    log = tmp / "sglang-requests.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [entry["body"] for entry in map(json.loads, lines) if entry["path"] == path]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def source(tmp, library):
    folder = make_source(tmp, library, {"alpha": "alpha", "dora": "gamma"})
    edit_config(folder / "dora", use_dora=True)
    return folder


@pytest.fixture(scope="module")
def servers(serve_factory, tmp, tiny_model, source):
    env = sglang_env(tmp, tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="30")
    return Reusable(lambda: serve_factory(env, name="sglang").wait_ready(timeout=60))


@pytest.fixture
def server(servers):
    return servers.get()


def test_started_with_the_sglang_command_and_flags(server):
    logs = server.logs()
    assert "-m sglang.launch_server --model-path" in logs
    assert "--max-lora-rank 16 --lora-target-modules q_proj k_proj v_proj o_proj" in logs
    meta = server.http.get("/v1/metadata").json()
    assert meta["profile"]["name"] == PROFILE and meta["backend"]["name"] == "sglang"


def test_adapters_present_at_start_are_served_in_both_name_forms(server, tmp):
    sent = len(seen_by_sglang(tmp))
    assert server.models() == ["tiny", "alpha"]
    alpha = server.complete("alpha")
    assert alpha != server.complete("tiny")
    assert server.complete("tiny:alpha") == alpha
    # Whatever form the client used, SGLang was sent `tiny:alpha`, never the bare name.
    models = {body["model"] for body in seen_by_sglang(tmp)[sent:]}
    assert models == {"tiny", "tiny:alpha"}


def test_unknown_and_invalid_names_never_reach_sglang(server, tmp):
    before = len(seen_by_sglang(tmp))
    for model in ("zeta", "tiny:zeta", "dora"):
        with pytest.raises(openai.NotFoundError):
            server.complete(model)
    with pytest.raises(openai.NotFoundError, match="DoRA"):
        server.complete("tiny:dora")
    assert len(seen_by_sglang(tmp)) == before


def test_lora_path_is_not_a_way_around(server, tmp):
    before = len(seen_by_sglang(tmp))
    with pytest.raises(openai.BadRequestError, match="lora_path"):
        server.openai.completions.create(model="tiny", prompt="Hi", max_tokens=2,
                                         extra_body={"lora_path": "alpha"})
    assert len(seen_by_sglang(tmp)) == before


def test_copy_in_remove_and_copy_back(server, tmp, own):
    name = own.add("beta")
    took = server.wait_for(lambda: name in server.models(), what=f"{name} served")
    assert took < 2  # events, not the 30 s interval
    beta = server.complete(name)
    assert beta not in (server.complete("tiny"), server.complete("alpha"))
    assert {"lora_name": name}.items() <= seen_by_sglang(tmp, "/load_lora_adapter")[-1].items()

    shutil.rmtree(own.path())
    server.wait_for(lambda: name not in server.models(), what=f"{name} removed")
    # Refused by us from the moment its folder went; SGLang's unload follows.
    server.wait_for(lambda: {"lora_name": name} in seen_by_sglang(tmp, "/unload_lora_adapter"),
                    what=f"{name} unloaded")
    assert seen_by_sglang(tmp, "/unload_lora_adapter")[-1] == {"lora_name": name}
    sent = len(seen_by_sglang(tmp))
    for model in (name, f"tiny:{name}"):
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            server.complete(model)
    # Refused by us: SGLang never got the request, so it could not silently reload it.
    assert len(seen_by_sglang(tmp)) == sent
    assert name not in server.models()

    own.add("beta")
    server.wait_for(lambda: name in server.models(), what=f"{name} back")
    assert server.complete(name) == beta


def test_changed_weights_are_unloaded_then_loaded(server, tmp, own, library):
    name = own.add("alpha")
    server.wait_served(name)
    gamma_weights = (library / "gamma" / "adapter_model.safetensors").read_bytes()
    before = server.complete(name)
    (own.path() / "adapter_model.safetensors").write_bytes(gamma_weights)
    server.wait_for(lambda: server.complete(name) != before, what="new weights")
    calls = [(e["path"], e["body"].get("lora_name")) for e in map(
        json.loads, (tmp / "sglang-requests.jsonl").read_text().splitlines())
        if e["path"] in ("/load_lora_adapter", "/unload_lora_adapter")]
    assert calls[-2:] == [("/unload_lora_adapter", name), ("/load_lora_adapter", name)]


def test_runtime_api_in_both_forms_on_sglang(server, tmp, source, library):
    store = source / ".store"  # under NIM_PEFT_SOURCE (allowed), hidden from the watcher
    copy_adapter(library / "beta", store / "s-api")
    reply = server.http.post("/load_lora_adapter", json={
        "lora_name": "s-api", "lora_path": str(store / "s-api"), "pinned": False})
    assert reply.status_code == 200 and reply.json()["success"] is True
    assert reply.json()["loaded_adapters"]["s-api"] == str(store / "s-api")
    sent = seen_by_sglang(tmp, "/load_lora_adapter")[-1]
    assert sent["lora_name"] == "s-api" and "/snapshots/" in sent["lora_path"]  # a snapshot
    assert server.complete("s-api") == server.complete("tiny:s-api") != server.complete("tiny")
    assert server.adapters()["s-api"]["origin"] == "api"
    again = server.http.post("/load_lora_adapter", json={
        "lora_name": "s-api", "lora_path": str(store / "s-api")})
    assert again.status_code == 400 and "already loaded" in again.json()["error_message"]
    reply = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "s-api"})
    assert reply.status_code == 200 and "removed successfully" in reply.text
    assert {"lora_name": "s-api"} in seen_by_sglang(tmp, "/unload_lora_adapter")
    with pytest.raises(openai.NotFoundError):
        server.complete("tiny:s-api")
    outside = tmp / "outside-store"
    copy_adapter(library / "beta", outside / "x")
    for route in ("/load_lora_adapter", "/v1/load_lora_adapter"):
        reply = server.http.post(route, json={"lora_name": "x", "lora_path": str(outside / "x")})
        assert reply.status_code == 403 and str(source) in reply.text


def test_lora_series_for_llm_d_made_from_what_the_entrypoint_sees(server):
    """SGLang has no `vllm:lora_requests_info`; the entrypoint makes it, so an llm-d endpoint
    picker can route by LoRA affinity on SGLang pods too."""
    first_chunk, scraped = threading.Event(), threading.Event()

    def stream() -> None:
        chunks = server.openai.completions.create(model="alpha", prompt="Hi", max_tokens=400,
                                                  stream=True)
        for _ in chunks:
            first_chunk.set()
            scraped.wait(30)
        chunks.close()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(30)
        text = server.http.get("/metrics").text
    finally:
        scraped.set()
        thread.join(30)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sample,) = families["vllm:lora_requests_info"].samples
    assert sample.labels == {"max_lora": "8", "running_lora_adapters": "alpha",
                             "waiting_lora_adapters": ""}
    assert abs(sample.value - time.time()) < 30  # a timestamp, as vLLM's
    loaded = {s.labels["adapter"] for s in families["lora_adapter_loaded"].samples}
    assert "alpha" in loaded
    idle = {f.name: f for f in text_string_to_metric_families(server.http.get("/metrics").text)}
    assert idle["vllm:lora_requests_info"].samples[0].labels["running_lora_adapters"] == ""


def test_sigterm_stops_everything(server):
    children = descendants(server.process.pid)
    assert children
    start = time.monotonic()
    assert server.terminate(timeout=30) == 0
    assert time.monotonic() - start < 30
    wait_gone(children)


def test_static_mode(serve_factory, tmp_path_factory, tiny_model, library):
    tmp = tmp_path_factory.mktemp("sglang-static")
    # big is rank 64: the derived --max-lora-rank covers it
    source = make_source(tmp, library, {"alpha": "alpha", "big": "big"})
    server = serve_factory(sglang_env(tmp, tiny_model, source), name="sglang-static")
    server.wait_ready(timeout=60)
    assert server.models() == ["tiny", "alpha", "big"]
    logs = server.logs()
    assert "--max-lora-rank 64" in logs and "--lora-paths alpha=" in logs
    assert server.complete("big") != server.complete("alpha")
    copy_adapter(library / "beta", source / "beta")
    holds(server.models, lambda models: "beta" not in models, seconds=1.5,
          what="static mode ignores a later adapter")
    assert "beta" not in server.models()
    assert server.terminate(timeout=30) == 0


def test_a_served_name_with_a_colon_is_refused_at_start(tmp_path, tiny_model, library):
    source = make_source(tmp_path, library)
    env = clean_env(**sglang_env(tmp_path, tiny_model, source, NIM_SERVED_MODEL_NAME="org:tiny"))
    result = subprocess.run([str(BIN), "serve"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: NIM_SERVED_MODEL_NAME=org:tiny: contains ':'")


def test_a_list_source_and_hf_uris_through_the_api_on_sglang(
        serve_factory, tmp_path, tiny_model, library, hub_server):
    """A list file (a folder entry, an hf:// entry) as NIM_PEFT_SOURCE and an hf:// lora_path in
    SGLang's form: both fetched from the Hub-compatible server, both answer as the same weights
    from a folder; a prefix not listed is a 403 naming the variable."""
    hub_server.commit("acme/s-list", library / "alpha")
    hub_server.commit("team/s-hub", library / "alpha")
    folders = make_source(tmp_path, library, {"alpha": "alpha"})
    listed = tmp_path / "etc" / "adapters.yaml"
    listed.parent.mkdir()
    listed.write_text(f"adapters:\n  - name: alpha\n    uri: {folders / 'alpha'}\n"
                      "  - name: s-list\n    uri: hf://acme/s-list\n")
    server = serve_factory(sglang_env(tmp_path, tiny_model, listed, NIM_PEFT_REFRESH_INTERVAL="30",
                                      NIM_PEFT_API_ALLOWED_PATHS="hf://team",
                                      **hub_server.env()), name="sglang-hub").wait_ready(timeout=60)
    server.wait_for(lambda: server.error_of("s-list") is None, timeout=60, what="s-list served")
    assert server.complete("s-list") == server.complete("alpha") != server.complete("tiny")
    reply = server.http.post("/load_lora_adapter", json={"lora_name": "s-hub",
                                                         "lora_path": "hf://team/s-hub"})
    assert reply.status_code == 200 and reply.json()["success"] is True, reply.text
    assert server.complete("s-hub") == server.complete("alpha")
    assert server.adapters()["s-hub"]["source"].startswith("hf://team/s-hub@")
    refused = server.http.post("/load_lora_adapter", json={"lora_name": "x",
                                                           "lora_path": "hf://acme/s-list"})
    assert refused.status_code == 403 and "NIM_PEFT_API_ALLOWED_PATHS" in refused.text
    # AIBrix's runtime form: `artifact_url`, with its huggingface:// scheme
    reply = server.http.post("/v1/lora_adapter/load", json={
        "lora_name": "s-aibrix", "artifact_url": "huggingface://team/s-hub"})
    assert reply.status_code == 200 and "added successfully" in reply.text, reply.text
    assert server.complete("s-aibrix") == server.complete("alpha")
    reply = server.http.post("/v1/lora_adapter/unload", json={"lora_name": "s-aibrix"})
    assert reply.status_code == 200 and "s-aibrix" not in server.models()
