"""The runtime adapter API and the fleet surface on the real vLLM (CPU), with an API key set, as
AIBrix's controller and llm-d's endpoint picker use them: load by path with a bearer token, use,
unload; confinement attacks; the watcher and the API over several intervals; a restart keeps the
API's adapters; `/metrics` with public names while a stream is in flight; forwarded and closed
routes."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import copy_adapter
from tests.e2e.server import (
    Reusable,
    descendants,
    find_backend,
    holds,
    listening_ports,
    make_source,
    tiny_env,
)

pytestmark = pytest.mark.e2e
KEY = "fleet-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-api")


@pytest.fixture(scope="module")
def source(tmp, library) -> Path:
    return make_source(tmp, library, {"ref-alpha": "alpha"})


@pytest.fixture(scope="module")
def models(tmp) -> Path:
    """A folder listed in NIM_PEFT_API_ALLOWED_PATHS (where a controller puts adapters)."""
    (tmp / "models").mkdir()
    return tmp / "models"


@pytest.fixture(scope="module")
def outside(tmp, library) -> Path:
    copy_adapter(library / "gamma", tmp / "outside" / "gamma")
    return tmp / "outside"


@pytest.fixture(scope="module")
def servers(serve_factory, tmp, tiny_model, source, models):
    env = tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="1", VLLM_API_KEY=KEY,
                   NIM_PEFT_API_ALLOWED_PATHS=str(models), NIM_CACHE_PATH=str(tmp / "cache"))
    return Reusable(lambda: serve_factory(env, name="runtime-api").wait_ready())


@pytest.fixture
def server(servers):
    return servers.get()


@pytest.fixture
def api(server):
    """A client with the key, as a fleet controller is configured."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=180) as client:
        yield client


def listed(api: httpx.Client) -> dict[str, dict]:
    return {card["id"]: card for card in api.get("/v1/models").json()["data"]}


def backend_listed(server) -> set[str]:
    """What vLLM itself holds (its own port, with the key it requires)."""
    with server.backend(headers=AUTH) as vllm:
        reply = vllm.get("/v1/models")
    return {card["id"] for card in reply.json()["data"]}


def complete(server, model: str, prompt: str = "Hello world") -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    result = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                       temperature=0, seed=0)
    return result.choices[0].text


def test_an_aibrix_style_controller_loads_uses_and_unloads(server, api, models, library):
    name, folder = "aibrix-sql", models / "aibrix-sql-v1"
    copy_adapter(library / "alpha", folder)
    body = {"lora_name": name, "lora_path": str(folder)}
    assert name not in listed(api)  # the controller looks first
    refused = httpx.post(server.url + "/v1/load_lora_adapter", json=body)
    assert refused.status_code == 401  # no key, no load
    reply = api.post("/v1/load_lora_adapter", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.text == f"Success: LoRA adapter '{name}' added successfully."
    card = listed(api)[name]
    assert card["parent"] == "tiny" and card["root"] == str(folder)
    record = api.get(f"/v1/adapters/{name}").json()
    assert record["origin"] == "api" and record["state"] == "ready"
    # the same weights as the folder adapter ref-alpha, so the same answer
    assert complete(server, name) == complete(server, "ref-alpha") != complete(server, "tiny")
    again = api.post("/v1/load_lora_adapter", json=body)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    reply = api.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert reply.status_code == 200
    assert reply.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert name not in listed(api) and name not in backend_listed(server)
    with pytest.raises(openai.NotFoundError):
        complete(server, name)
    gone = api.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert gone.status_code == 404 and "cannot be found" in gone.json()["error"]["message"]


def test_sglang_form_works_on_vllm(server, api, models, library):
    name, folder = "sgl-form", models / "sgl-form"
    copy_adapter(library / "beta", folder)
    reply = api.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder),
                                                  "pinned": False})
    assert reply.status_code == 200 and reply.json()["success"] is True
    assert reply.json()["loaded_adapters"][name] == str(folder)
    assert complete(server, name)
    reply = api.post("/unload_lora_adapter", json={"lora_name": name})
    assert reply.status_code == 200 and reply.json()["success"] is True
    reply = api.post("/unload_lora_adapter", json={"lora_name": name})
    assert reply.status_code == 400 and "does not exist" in reply.json()["error_message"]


def test_confinement_attacks_get_a_403_and_reach_nothing(server, api, source, models, outside):
    os.symlink(outside / "gamma", source / "link-out", target_is_directory=True)
    os.symlink(outside / "gamma", models / "link-out", target_is_directory=True)
    sneaky = models / "sneaky"
    sneaky.mkdir()
    for file in (outside / "gamma").iterdir():  # a real folder whose files are links out
        os.symlink(file, sneaky / file.name)
    before = backend_listed(server)
    try:
        for path in (str(outside / "gamma"), f"{models}/../outside/gamma",
                     str(source / "link-out"), str(models / "link-out"), str(sneaky), "/etc",
                     "/proc/self/cwd"):
            reply = api.post("/v1/load_lora_adapter", json={"lora_name": "evil",
                                                             "lora_path": path})
            message = reply.json()["error"]["message"]
            assert reply.status_code == 403, (path, reply.text)
            assert str(source) in message and str(models) in message, message
            reply = api.post("/load_lora_adapter", json={"lora_name": "evil", "lora_path": path})
            assert reply.status_code == 403 and reply.json()["success"] is False
        relative = api.post("/v1/load_lora_adapter", json={"lora_name": "evil",
                                                            "lora_path": "gamma"})
        assert relative.status_code == 400
        # vLLM's own SageMaker-style route would load from any path: closed here
        sagemaker = api.post("/adapters", json={"name": "evil", "src": str(outside / "gamma")})
        assert sagemaker.status_code == 404
        assert backend_listed(server) == before and "evil" not in server.adapters(AUTH)
    finally:
        for link in (source / "link-out", models / "link-out"):
            link.unlink()


def test_watcher_and_api_do_not_fight_over_several_intervals(server, api, source, models,
                                                             library):
    folder_name, api_name = "wa-folder", "wa-api"
    copy_adapter(library / "alpha", source / folder_name)
    copy_adapter(library / "beta", models / api_name)
    try:
        server.wait_served(folder_name, headers=AUTH)
        assert api.post("/v1/load_lora_adapter", json={
            "lora_name": api_name, "lora_path": str(models / api_name)}).status_code == 200
        assert api.post("/v1/unload_lora_adapter",
                        json={"lora_name": folder_name}).status_code == 200
        # NIM's watcher loads the unloaded folder again at its next scan, and a plain watcher
        # would unload what the folder lacks; over 4 intervals (1 s) neither happens here.
        holds(lambda: listed(api), lambda cards: folder_name not in cards and api_name in cards,
              seconds=4.0, what="API decisions kept by the watcher")
        assert server.adapters(AUTH)[folder_name]["state"] == "unloaded"
        assert folder_name not in backend_listed(server)
        (source / folder_name / "README.md").write_text("retrained")  # its files change
        server.wait_served(folder_name, headers=AUTH)
        assert api_name in listed(api)
    finally:
        api.post("/v1/unload_lora_adapter", json={"lora_name": api_name})
        shutil.rmtree(source / folder_name)
        server.wait_unlisted([folder_name, api_name], timeout=60, headers=AUTH)


def test_metrics_show_lora_series_with_public_names_while_a_stream_runs(server, api, source,
                                                                        models, library):
    busy, idle = "m-busy", "m-idle"
    copy_adapter(library / "gamma", models / busy)
    for name in (busy,):
        assert api.post("/v1/load_lora_adapter", json={
            "lora_name": name, "lora_path": str(models / name)}).status_code == 200
    copy_adapter(library / "beta", source / idle)
    server.wait_served(idle, headers=AUTH)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    first_chunk, scraped = threading.Event(), threading.Event()
    started = time.time()

    def stream() -> None:
        chunks = client.completions.create(model=busy, prompt="Hi", max_tokens=200,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for _ in chunks:
            first_chunk.set()
            scraped.wait(60)  # the stream stays open until /metrics was read
        chunks.close()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert first_chunk.wait(60)
        # Scraped while the client's stream is open. vLLM's gauge keeps one series per label
        # set, valued with the time it last saw it: the series naming the adapter must be one
        # vLLM set during this stream. (On 2 cores vLLM's engine starves its own API server,
        # which answers /metrics only once the generation ends; the newest series may already
        # be the idle one then.)
        text = httpx.get(server.url + "/metrics").text  # no key: scrapers send none
        scraped.set()
        info = [s for f in text_string_to_metric_families(text)
                if f.name == "vllm:lora_requests_info" for s in f.samples]
        running = {s.labels["running_lora_adapters"] for s in info if s.value >= started}
        assert busy in running, info
        assert all(s.labels["max_lora"] == "8" for s in info)
        assert all(set(names.split(",")) <= {busy, ""} for names in running)
        text = httpx.get(server.url + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        loaded = {s.labels["adapter"] for s in families["lora_adapter_loaded"].samples}
        assert {busy, idle, "ref-alpha"} <= loaded  # residency, idle adapters included
        assert "vllm:num_requests_running" in families
        assert httpx.get(server.url + "/v1/metrics").status_code == 401  # /v1 wants the key
    finally:
        scraped.set()
        thread.join(60)
        api.post("/v1/unload_lora_adapter", json={"lora_name": busy})
        shutil.rmtree(source / idle)
        server.wait_unlisted([idle, busy], timeout=60, headers=AUTH)


def test_nothing_on_the_host_but_the_entrypoint_reaches_vllm(server):
    """vLLM 0.32 guards only its /v1 routes with the key: SageMaker's `POST /adapters` on its
    loopback port loaded an adapter under a served name without one, and a public request was
    answered with those weights. vLLM now listens on a Unix socket in a folder only the
    entrypoint's user may enter, and on no TCP port that answers HTTP."""
    import stat

    vllm = find_backend(server.process.pid)
    started = next(line for line in server.logs().splitlines() if "starting vllm:" in line)
    assert " --uds " in started and " --port " not in started
    for port in listening_ports([vllm, *descendants(vllm)]):  # its engine's own: no HTTP
        try:
            reply = httpx.post(f"http://127.0.0.1:{port}/adapters", timeout=2, json={})
        except httpx.HTTPError:
            continue
        raise AssertionError(f"port {port} answers HTTP: {reply.status_code} {reply.text}")
    socket_path = Path(server.backend_socket())
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    with server.backend(headers=AUTH) as direct:  # this user, through the socket: vLLM
        assert "ref-alpha" in {card["id"] for card in direct.get("/v1/models").json()["data"]}


def test_user_routes_are_forwarded_and_admin_routes_stay_closed(server, api):
    tokens = api.post("/tokenize", json={"model": "ref-alpha", "prompt": "Hi"})
    assert tokens.status_code == 200 and tokens.json()["count"] == 2
    text = api.post("/detokenize", json={"model": "tiny", "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and text.json()["prompt"].strip() == "Hi"
    assert httpx.post(server.url + "/tokenize", json={"prompt": "Hi"}).status_code == 401
    assert api.post("/tokenize", json={"model": "nope", "prompt": "Hi"}).status_code == 404
    response = api.post("/v1/responses", json={"model": "ref-alpha", "input": "Hello",
                                               "max_output_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "response"
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").status_code == 200
    # a generation model has no embeddings: the answer is vLLM's own, not a closed route's
    embeddings = api.post("/v1/embeddings", json={"model": "tiny", "input": "Hi"})
    assert "Route /v1/embeddings not found" not in embeddings.text
    for path in ("/reset_prefix_cache", "/sleep", "/wake_up", "/collective_rpc",
                 "/invocations", "/start_profile", "/scale_elastic_ep", "/pause"):
        reply = api.post(path, json={})
        assert reply.status_code == 404 and f"Route {path} not found" in reply.text
    assert api.delete("/adapters/ref-alpha").status_code == 404
    assert "ref-alpha" in backend_listed(server)


def test_a_restart_keeps_the_api_adapters_and_unloads(servers, server, api, source, models,
                                                     library):
    kept, off = "keep-me", "stay-off"
    copy_adapter(library / "gamma", models / kept)
    copy_adapter(library / "beta", source / off)
    server.wait_served(off, headers=AUTH)
    assert api.post("/v1/load_lora_adapter", json={
        "lora_name": kept, "lora_path": str(models / kept)}).status_code == 200
    assert api.post("/v1/unload_lora_adapter", json={"lora_name": off}).status_code == 200
    answer = complete(server, kept)
    assert server.terminate() == 0
    restarted = servers.get()  # same NIM_CACHE_PATH, a new vLLM
    with httpx.Client(base_url=restarted.url, headers=AUTH, timeout=60) as fresh:
        cards = listed(fresh)  # at ready, not later
        assert kept in cards and off not in cards
        assert fresh.get(f"/v1/adapters/{kept}").json()["origin"] == "api"
        assert fresh.get(f"/v1/adapters/{off}").json()["state"] == "unloaded"
        assert complete(restarted, kept) == answer
        assert fresh.post("/v1/unload_lora_adapter", json={"lora_name": kept}).status_code == 200
    shutil.rmtree(source / off)
    restarted.wait_unlisted([off, kept], timeout=60, headers=AUTH)
