"""Serving adapters from an S3-compatible store (NIM_PEFT_SOURCE=s3://BUCKET/PREFIX), through the
CLI as a user starts it, against a real store (SeaweedFS on loopback): on the SGLang double the
whole life of an adapter (added, half-uploaded, changed, removed) and a store outage of several
intervals; on the real vLLM, that an adapter from the store answers exactly as the same files
loaded from a folder."""

from __future__ import annotations

import time

import pytest

from tests.e2e.server import Reusable, sglang_env, tiny_env, wait_until
from tests.sources.test_s3 import WEIGHTS, upload

pytestmark = pytest.mark.e2e
CONFIG = "adapter_config.json"


def served_as(server, name: str, expected: str, timeout: float = 30.0) -> None:
    """Wait until `name` answers `expected` (or, for None, is refused with 404)."""
    wait_until(lambda: server.error_of(name) if expected is None else (
        server.error_of(name) or server.complete(name)),
        lambda got: (got is not None and "404" in got) if expected is None else got == expected,
        timeout=timeout, what=f"{name} answering {expected!r}", context=server._tail)


@pytest.fixture(scope="module")
def store_bucket(s3_store):
    name = "sglang-source"
    s3_store.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def sglang(serve_factory, tmp_path_factory, tiny_model, library, s3_store, store_bucket):
    tmp = tmp_path_factory.mktemp("s3-sglang")
    upload(s3_store.client(), store_bucket, "alpha", library / "alpha")
    env = sglang_env(tmp, tiny_model, tmp, NIM_PEFT_REFRESH_INTERVAL="1",
                     **s3_store.env(NIM_PEFT_SOURCE=f"s3://{store_bucket}/loras"))
    return Reusable(lambda: serve_factory(env, name="s3-sglang").wait_ready(timeout=60))


def test_an_adapter_lives_and_goes_with_its_objects_on_sglang(sglang, s3_store, store_bucket,
                                                              library):
    server = sglang.get()
    client = s3_store.client()
    listed = server.adapters()
    assert listed["alpha"]["ready"] and listed["alpha"]["source"] == \
        f"s3://{store_bucket}/loras/alpha/"
    alpha = server.complete("alpha")
    assert alpha != server.complete("tiny")
    # Added: served within a few intervals.
    upload(client, store_bucket, "beta", library / "beta")
    server.wait_adapters(lambda a: a.get("beta", {}).get("ready"), what="beta served")
    beta = server.complete("beta")
    assert beta not in (alpha, server.complete("tiny"))
    # Half uploaded (config only): pending, and never served.
    upload(client, store_bucket, "gamma", library / "gamma", only=CONFIG)
    server.wait_adapters(lambda a: a.get("gamma", {}).get("state") == "pending",
                         what="gamma pending", only=["gamma"])
    assert "404" in server.error_of("gamma")
    upload(client, store_bucket, "gamma", library / "gamma", only=WEIGHTS)
    server.wait_adapters(lambda a: a.get("gamma", {}).get("ready"), what="gamma served")
    # Changed: alpha's weights become beta's; alpha then answers as beta does.
    upload(client, store_bucket, "alpha", library / "beta", only=WEIGHTS)
    served_as(server, "alpha", beta)
    # The runtime API: an adapter from the store unloaded stays unloaded over many passes;
    # folders need NIM_PEFT_API_ALLOWED_PATHS; a change of its objects serves it again.
    reply = server.http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert reply.status_code == 200, reply.text
    time.sleep(3)  # three intervals
    assert "404" in server.error_of("gamma")
    assert server.adapters()["gamma"]["state"] == "unloaded"
    reply = server.http.post("/v1/load_lora_adapter", json={
        "lora_name": "other", "lora_path": str(library / "gamma")})
    assert reply.status_code == 403 and "NIM_PEFT_API_ALLOWED_PATHS" in reply.text, reply.text
    upload(client, store_bucket, "gamma", library / "alpha", only=WEIGHTS)
    served_as(server, "gamma", alpha)
    # Removed: 404, and the models list no longer names it.
    for key in (CONFIG, WEIGHTS, "README.md"):
        client.delete_object(Bucket=store_bucket, Key=f"loras/gamma/{key}")
    served_as(server, "gamma", None)
    assert "gamma" not in server.models()


def test_a_store_outage_keeps_every_adapter_served(sglang, s3_store, store_bucket, library):
    server = sglang.get()
    upload(s3_store.client(), store_bucket, "delta", library / "gamma")
    server.wait_adapters(lambda a: a.get("delta", {}).get("ready"), what="delta served")
    before = {name: server.complete(name) for name in server.models()}
    s3_store.stop()
    try:
        wait_until(server.logs, lambda logs: "cannot be reached" in logs, timeout=15,
                   what="the outage logged")
        for _ in range(4):  # several intervals of 1 s: all still served, still ready
            wait_until(lambda: {n: server.complete(n) for n in before}, lambda got: got == before,
                       timeout=5, what="answers unchanged during the outage")
            assert server.http.get("/v1/health/ready").status_code == 200
        outage = [line for line in server.logs().splitlines() if "cannot be reached" in line]
        assert len(outage) == 1, outage  # one clear line, not one per pass
        assert "NIM_PEFT_SOURCE=s3://" in outage[0] and "AWS_ENDPOINT_URL" in outage[0]
    finally:
        s3_store.start()
    # Back: what changed meanwhile is picked up (within the backoff, at most a minute).
    upload(s3_store.client(), store_bucket, "epsilon", library / "alpha")
    server.wait_adapters(lambda a: a.get("epsilon", {}).get("ready"), what="epsilon served",
                         timeout=75)
    assert "can be read again" in server.logs()


def test_vllm_serves_an_adapter_from_the_store_as_from_a_folder(
        serve_factory, tmp_path_factory, tiny_model, library, s3_store):
    """The same files from the store and from a folder (the runtime API loads the library's copy
    beside it) answer the same, before and after the object changes."""
    tmp = tmp_path_factory.mktemp("s3-vllm")
    client = s3_store.client()
    client.create_bucket(Bucket="vllm-source")
    upload(client, "vllm-source", "alpha", library / "alpha")
    env = tiny_env(tiny_model, tmp, NIM_PEFT_REFRESH_INTERVAL="1", NIM_MAX_LORA_RANK="16",
                   NIM_PEFT_API_ALLOWED_PATHS=str(library),
                   **s3_store.env(NIM_PEFT_SOURCE="s3://vllm-source/loras"))
    server = serve_factory(env, name="s3-vllm").wait_ready()
    assert server.adapters()["alpha"]["source"] == "s3://vllm-source/loras/alpha/"
    for variant in ("alpha", "beta"):
        reply = server.http.post("/v1/load_lora_adapter", json={
            "lora_name": f"folder-{variant}", "lora_path": str(library / variant)})
        assert reply.status_code == 200, reply.text
    reply = server.http.post("/v1/load_lora_adapter", json={  # the store's name is taken
        "lora_name": "alpha", "lora_path": str(library / "beta")})
    assert reply.status_code == 400 and "comes from NIM_PEFT_SOURCE" in reply.text, reply.text
    from_folder = {v: server.complete(f"folder-{v}") for v in ("alpha", "beta")}
    assert from_folder["alpha"] != from_folder["beta"]
    assert server.complete("alpha") == from_folder["alpha"]
    upload(client, "vllm-source", "alpha", library / "beta", only=WEIGHTS)
    served_as(server, "alpha", from_folder["beta"], timeout=60)
    # The rest of an adapter's life on vLLM: added, half-uploaded (pending, 404), removed.
    upload(client, "vllm-source", "gamma", library / "alpha")
    served_as(server, "gamma", from_folder["alpha"], timeout=60)
    upload(client, "vllm-source", "delta", library / "beta", only=CONFIG)
    server.wait_adapters(lambda a: a.get("delta", {}).get("state") == "pending",
                         what="delta pending", only=["delta"])
    assert "404" in server.error_of("delta")
    for key in (CONFIG, WEIGHTS, "README.md"):
        client.delete_object(Bucket="vllm-source", Key=f"loras/gamma/{key}")
    served_as(server, "gamma", None, timeout=60)
    # A store outage of several intervals: vLLM keeps serving what it holds, ready throughout.
    s3_store.stop()
    try:
        for _ in range(3):
            time.sleep(1)
            assert server.complete("alpha") == from_folder["beta"]
            assert server.http.get("/v1/health/ready").status_code == 200
        assert "cannot be reached" in server.logs()
    finally:
        s3_store.start()


def test_replicas_on_one_bucket_converge_and_static_mode_lists_once(
        serve_factory, tmp_path_factory, tiny_model, library, s3_store):
    """Two dynamic replicas and one static server on one bucket: the replicas end on the same
    adapters and versions; the static server serves what was there at start, and only that."""
    client = s3_store.client()
    client.create_bucket(Bucket="replicas")
    upload(client, "replicas", "alpha", library / "alpha")
    source = {"NIM_PEFT_SOURCE": "s3://replicas/loras"}
    servers = []
    for name, interval in (("replica-1", "1"), ("replica-2", "1"), ("static", None)):
        tmp = tmp_path_factory.mktemp(name)
        extra = {"NIM_PEFT_REFRESH_INTERVAL": interval} if interval else {}
        servers.append(serve_factory(
            sglang_env(tmp, tiny_model, tmp, **extra, **s3_store.env(**source)), name=name))
    replicas, static = [s.wait_ready(timeout=60) for s in servers[:2]], servers[2].wait_ready(60)

    def versions(server) -> dict[str, str]:
        return {n: a["served_version"] for n, a in server.adapters().items() if a["ready"]}

    start = versions(replicas[0])["alpha"]
    upload(client, "replicas", "beta", library / "beta")
    upload(client, "replicas", "alpha", library / "gamma", only=WEIGHTS)
    for replica in replicas:  # both adapters, alpha in its new version, on each replica
        wait_until(lambda r=replica: versions(r), lambda got: set(got) == {"alpha", "beta"}
                   and got["alpha"] != start, timeout=30, what="beta and the new alpha served")
    assert versions(replicas[0]) == versions(replicas[1])
    assert replicas[0].complete("alpha") == replicas[1].complete("alpha")
    assert replicas[0].complete("beta") == replicas[1].complete("beta")
    # Static: alpha as it was at start, and no beta.
    assert set(versions(static)) == {"alpha"} and "404" in static.error_of("beta")
    assert static.complete("alpha") != replicas[0].complete("alpha")
    assert static.adapters()["alpha"]["source"] == "s3://replicas/loras/alpha/"
