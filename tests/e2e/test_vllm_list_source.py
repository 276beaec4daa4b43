"""A list file as NIM_PEFT_SOURCE on the real vLLM: a folder entry and an hf:// entry from the
Hub-compatible server of the tests answer as the same adapters served from a folder; a new
commit on the followed branch is swapped in; an entry removed is unloaded. On the same server,
runtime API loads from hf:// URIs in Dynamo's form and vLLM's answer alike, and a URI outside
NIM_PEFT_API_ALLOWED_PATHS is refused."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.server import make_source, tiny_env

pytestmark = pytest.mark.e2e


def write(file, entries: dict[str, str]) -> None:
    file.write_text("adapters:\n" + "".join(f"  - name: {name}\n    uri: {uri}\n"
                                            for name, uri in entries.items()))


def test_folder_and_hub_entries_answer_as_from_a_folder(serve_factory, tiny_model, library,
                                                        hub_server, tmp_path):
    hub_server.commit("acme/pirate", library / "alpha")
    plain = make_source(tmp_path, library, {"alpha": "alpha", "beta": "beta"})
    listed = tmp_path / "etc" / "adapters.yaml"
    listed.parent.mkdir()
    write(listed, {"from-folder": str(plain / "beta"), "from-hub": "hf://acme/pirate"})
    server = serve_factory(tiny_env(tiny_model, listed, NIM_PEFT_REFRESH_INTERVAL="1",
                                    NIM_MAX_LORA_RANK="16", NIM_CACHE_PATH=str(tmp_path / "c"),
                                    NIM_PEFT_API_ALLOWED_PATHS="hf://team",
                                    **hub_server.env()), name="list").wait_ready()
    reference = serve_factory(tiny_env(tiny_model, plain, NIM_MAX_LORA_RANK="16",
                                       NIM_CACHE_PATH=str(tmp_path / "r")),
                              name="plain").wait_ready()
    server.wait_for(lambda: server.error_of("from-hub") is None and
                    server.error_of("from-folder") is None, timeout=60, what="both served")
    assert server.complete("from-hub") == reference.complete("alpha")
    assert server.complete("from-folder") == reference.complete("beta")
    assert server.adapters()["from-hub"]["source"].startswith("hf://acme/pirate@")
    hub_server.commit("acme/pirate", library / "beta")  # the branch moves on
    server.wait_for(lambda: server.complete("from-hub") == reference.complete("beta"),
                    timeout=60, what="the new commit served")
    write(listed, {"from-hub": "hf://acme/pirate"})
    server.wait_for(lambda: server.error_of("from-folder") is not None, timeout=30,
                    what="the removed entry unloaded")
    assert "from-folder" not in server.models()

    runtime_api_loads_from_uris(server, reference, hub_server, library)


def runtime_api_loads_from_uris(server, reference, hub_server, library) -> None:
    hub_server.commit("team/dynamo", library / "alpha")
    hub_server.commit("team/vllm", library / "beta")
    api = httpx.Client(base_url=server.url, timeout=120)
    reply = api.post("/v1/loras", json={"lora_name": "dyn", "source": {"uri": "hf://team/dynamo"}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "success" and body["lora_name"] == "dyn"
    assert body["message"] == "LoRA adapter 'dyn' loaded successfully"
    assert isinstance(body["lora_id"], int) and body["lora_id"] > 0
    reply = api.post("/v1/load_lora_adapter", json={"lora_name": "vl",
                                                    "lora_path": "hf://team/vllm"})
    assert reply.status_code == 200, reply.text
    assert server.complete("dyn") == reference.complete("alpha")
    assert server.complete("vl") == reference.complete("beta")
    assert server.adapters()["dyn"]["source"].startswith("hf://team/dynamo@")
    listing = api.get("/v1/loras").json()
    assert {"dyn", "vl"} <= set(listing["loras"]) and listing["count"] == len(listing["loras"])
    for uri in ("hf://acme/pirate", "hf://team/../acme/pirate", "hf://team%2f..%2facme/pirate"):
        refused = api.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": uri})
        assert refused.status_code == 403, (uri, refused.text)
        assert "NIM_PEFT_API_ALLOWED_PATHS" in refused.json()["error"]["message"]
    refused = api.post("/v1/loras", json={"lora_name": "x", "source": {"uri": "hf://acme/pirate"}})
    assert refused.status_code == 403 and refused.json()["status"] == "error"
    gone = api.delete("/v1/loras/dyn")
    assert gone.status_code == 200 and gone.json()["message"] == \
        "LoRA adapter 'dyn' unloaded successfully"
    assert "dyn" not in server.models() and "dyn" not in api.get("/v1/loras").json()["loras"]
    missing = api.delete("/v1/loras/dyn")
    assert missing.status_code == 404 and missing.json()["status"] == "error"
