"""The public port against a fast stand-in backend: names, errors, limits, adapters, metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from entrypoint.backends.sglang import SGLangBackend
from entrypoint.backends.vllm import VLLMBackend
from entrypoint.gateway.app import build_app
from entrypoint.gateway.bodies import read_facts, renamed
from entrypoint.gateway.errors import Refusal
from entrypoint.gateway.intake import MAX_BODY_BYTES
from entrypoint.gateway.routing import Target, resolve
from entrypoint.gateway.state import GatewayState
from entrypoint.gateway.upstream import Upstream
from entrypoint.logs import JSONLineFormatter
from entrypoint.metrics import Metrics
from entrypoint.reconcile.registry import AdapterRecord, Registry, State
from tests.e2e.server import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upstream():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstream", "--port",
                                str(port), "--adapters", "alpha,ghost"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/health")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    process.kill()
    process.wait(10)


def make_state(upstream: str, *, timeout: float = 5.0) -> GatewayState:
    registry = Registry()
    registry.put(AdapterRecord(name="alpha", state=State.READY, source=Path("/loras/alpha"),
                               loaded_path=Path("/snap/alpha-1"), version="v1",
                               loaded_version="v1", rank=8, size=100))
    registry.put(AdapterRecord(name="copying", state=State.PENDING, version="v0",
                               reason="incomplete: weights file still being written"))
    registry.put(AdapterRecord(name="big", state=State.FAILED, rank=64, version="v2",
                               reason="rank 64 is above NIM_MAX_LORA_RANK=16"))
    registry.put(AdapterRecord(name="first", state=State.LOADING, version="v3"))
    state = GatewayState(served_name="tiny", backend=VLLMBackend(), registry=registry,
                         client=None, readiness=lambda: None, backend_up=True,
                         metrics=Metrics(registry))
    state.upstream = (upstream, timeout)
    return state


def run(state: GatewayState, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        url, timeout = state.upstream
        state.client = Upstream(url, read_timeout=timeout, connect_timeout=2,
                                headers=getattr(state, "client_headers", None))
        try:
            transport = httpx.ASGITransport(app=build_app(state))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await client.request(method, path, **kwargs)
        finally:
            await state.client.close()

    return asyncio.run(go())


def complete(state, model, **extra):
    return run(state, "POST", "/v1/completions",
               json={"model": model, "prompt": "hi", "max_tokens": 2, **extra})


def test_names_are_translated_and_forwarded(upstream):
    state = make_state(upstream)
    assert complete(state, "tiny").json()["model"] == "tiny"
    assert complete(state, "alpha").json()["model"] == "alpha"
    assert complete(state, "tiny:alpha").json()["model"] == "alpha"


@pytest.mark.parametrize(("model", "message"), [
    ("zeta", "The model 'zeta' does not exist."),
    ("tiny:zeta", "The model 'tiny:zeta' does not exist."),
    ("copying", "The adapter 'copying' is not ready yet: incomplete: weights file still"),
    ("first", "The adapter 'first' is still loading"),
    ("big", "The adapter 'big' failed to load: rank 64 is above NIM_MAX_LORA_RANK=16"),
    ("ghost", "The model 'ghost' does not exist."),  # in the backend but not ours
])
def test_not_ready_names_get_an_openai_404(upstream, model, message):
    reply = complete(make_state(upstream), model)
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["message"].startswith(message)
    assert error["type"] == "NotFoundError" and error["code"] == "model_not_found"


def test_models_lists_base_and_ready_adapters_with_their_folders(upstream):
    cards = run(make_state(upstream), "GET", "/v1/models").json()["data"]
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
        ("tiny", "/models/tiny", None), ("alpha", "/loras/alpha", "tiny")]


def test_adapters_endpoint_reports_every_folder(upstream):
    state = make_state(upstream)
    listed = run(state, "GET", "/v1/adapters").json()["data"]
    assert [(a["name"], a["state"], a["ready"]) for a in listed] == [
        ("alpha", "ready", True), ("big", "failed", False), ("copying", "pending", False),
        ("first", "loading", False)]
    big = run(state, "GET", "/v1/adapters/big").json()
    assert big["reason"] == "rank 64 is above NIM_MAX_LORA_RANK=16" and big["rank"] == 64
    assert big["version"] == "v2" and big["since"].endswith("+00:00")
    assert run(state, "GET", "/v1/adapters/nope").status_code == 404
    assert big["fetch"] is None  # no download under way


def test_adapters_endpoint_shows_a_download_under_way(upstream):
    from entrypoint.fetches import FetchLog

    state = make_state(upstream)
    state.fetches = FetchLog()
    state.fetches.begin("copying", "s3://bucket/loras/copying", total=40 << 20).add(10 << 20)
    listed = {a["name"]: a for a in run(state, "GET", "/v1/adapters").json()["data"]}
    assert listed["copying"]["fetch"] == {"done_bytes": 10 << 20, "total_bytes": 40 << 20}
    assert listed["alpha"]["fetch"] is None
    assert run(state, "GET", "/v1/adapters/copying").json()["fetch"]["done_bytes"] == 10 << 20


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"content": b"{not json"}, 400, "not valid JSON"),
    ({"content": b"[1, 2]"}, 400, "must be a JSON object"),
    ({"json": {"model": 7, "prompt": "x"}}, 400, "'model' must be a string"),
    ({"json": {"model": "tiny", "prompt": "x", "lora_path": "alpha"}}, 400, "'lora_path'"),
    ({"content": b"x" * (MAX_BODY_BYTES + 1)}, 413, "Request body over 32 MiB"),
])
def test_bad_bodies_never_reach_the_backend(upstream, kwargs, status, message):
    reply = run(make_state(upstream), "POST", "/v1/completions",
                headers={"content-type": "application/json"}, **kwargs)
    assert reply.status_code == status
    assert message in reply.json()["error"]["message"]


ADMIN_ROUTES = [("POST", "/adapters"), ("DELETE", "/adapters/alpha"), ("POST", "/invocations"),
                ("POST", "/reset_prefix_cache"), ("POST", "/sleep"), ("POST", "/wake_up"),
                ("POST", "/collective_rpc"), ("POST", "/start_profile"),
                ("POST", "/update_weights"), ("POST", "/scale_elastic_ep"),
                ("POST", "/inference/v1/generate"), ("POST", "/pause"), ("GET", "/nope")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_backend_admin_routes_stay_closed(upstream, method, path):
    """The stand-in answers every one of these with 200 "admin route reached"; through the
    public port each is a 404 that never reaches it (an allowlist: unknown routes are closed)."""
    assert httpx.request(method, upstream + path, json={}).text == "Success: admin route reached" \
        or path == "/nope"
    body = {"lora_name": "x", "lora_path": "/etc", "model": "alpha", "prompt": "p"}
    reply = run(make_state(upstream), method, path, json=body)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "NotFoundError"
    assert "reached" not in reply.text


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize",
                                  "/v1/messages", "/v1/rerank", "/pooling", "/classify"])
@pytest.mark.parametrize("backend", [VLLMBackend(), SGLangBackend()], ids=["vllm", "sglang"])
def test_user_routes_are_forwarded_with_the_model_name_translated(upstream, path, backend):
    state = make_state(upstream)
    state.backend = backend
    reply = run(state, "POST", path, json={"model": "alpha", "input": "hi"})
    assert reply.status_code == 200
    assert reply.json()["model"] == backend.request_model("tiny", "alpha")
    assert run(state, "POST", path, json={"model": "big", "input": "hi"}).status_code == 404
    assert run(state, "POST", path, json={"input": "hi"}).json()["model"] is None  # base


def test_plain_routes_are_forwarded_and_the_api_is_off_without_a_reconciler(upstream):
    state = make_state(upstream)
    assert run(state, "GET", "/version").json() == {"version": "0.0-fake"}
    assert run(state, "GET", "/health").status_code == 200
    assert run(state, "GET", "/v1/responses/resp_1").json()["id"] == "resp_1"
    for odd in ("%2e%2e", "a%2fb", "x.y"):  # an id is one plain segment, nothing else
        assert run(state, "GET", f"/v1/responses/{odd}").status_code == 404
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        reply = run(state, "POST", path, json={"lora_name": "x", "lora_path": "/etc"})
        assert reply.status_code == 404 and "API is off" in reply.json()["error"]["message"]
    reply = run(state, "POST", "/load_lora_adapter", json={"lora_name": "x", "lora_path": "/e"})
    assert reply.status_code == 404 and reply.json()["success"] is False


def test_backend_down_is_a_502_and_slow_is_a_504(upstream):
    down = make_state(f"http://127.0.0.1:{free_port()}")
    reply = complete(down, "tiny")
    assert reply.status_code == 502 and "not reachable" in reply.json()["error"]["message"]
    slow = make_state(upstream, timeout=0.5)
    start = time.monotonic()
    reply = run(slow, "POST", "/v1/completions", json={"model": "tiny", "prompt": "hang"})
    assert reply.status_code == 504 and time.monotonic() - start < 5


def test_streams_pass_through_and_a_dying_backend_ends_the_stream(upstream):
    state = make_state(upstream)
    reply = complete(state, "alpha", stream=True, max_tokens=5)
    events = [line for line in reply.text.splitlines() if line.startswith("data: ")]
    assert len(events) == 6 and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["model"] == "alpha"
    cut = run(state, "POST", "/v1/completions",
              json={"model": "tiny", "prompt": "die", "stream": True, "max_tokens": 5})
    assert cut.text.count("data: ") == 3  # two chunks, then an error event: ended, not hung
    assert "stopped answering mid-stream" in cut.text.splitlines()[-2]
    assert state.traffic.running("alpha") == 0


def test_metrics_count_requests_and_append_the_backends(upstream):
    state = make_state(upstream)
    complete(state, "alpha")
    complete(state, "alpha")
    complete(state, "zeta")
    complete(state, "big")
    text = run(state, "GET", "/v1/metrics").text
    assert 'lora_requests_total{adapter="alpha"} 2.0' in text
    assert 'lora_request_errors_total{adapter="big",status="404"} 1.0' in text  # a known name
    assert 'lora_request_errors_total{adapter="(unknown)",status="404"} 1.0' in text
    assert "zeta" not in text
    assert 'lora_adapters{state="failed"} 1.0' in text
    assert 'lora_adapter_ready{adapter="alpha"} 1.0' in text
    assert "vllm:num_requests_running" in text  # the backend's own, appended


def test_request_logs_as_json_lines(upstream, caplog):
    caplog.set_level(logging.INFO, logger="entrypoint.access")
    complete(make_state(upstream), "tiny:alpha")
    record = next(r for r in caplog.records if r.name == "entrypoint.access")
    entry = json.loads(JSONLineFormatter().format(record))
    assert entry["model"] == "tiny:alpha" and entry["adapter"] == "alpha"
    assert entry["status"] == 200 and entry["duration_ms"] >= 0
    assert entry["path"] == "/v1/completions" and entry["level"] == "INFO"


def test_public_socket_disables_nagle():
    """Without TCP_NODELAY a keep-alive client waited 40 ms (delayed ACK) for every answer."""
    import socket

    from entrypoint.runtime.net import listen

    sock = listen("127.0.0.1", free_port())
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_an_upstream_error_never_looks_like_no_models(upstream):
    state = make_state(upstream + "/locked")
    reply = run(state, "GET", "/v1/models")
    assert reply.status_code == 502
    assert "HTTP 401" in reply.json()["error"]["message"]


def test_api_key_guards_v1_but_not_health_and_the_backend_gets_ours(upstream):
    state = make_state(upstream)
    state.api_keys = ("k1", "k2")

    def call(path, key=None, method="GET", **kwargs):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return run(state, method, path, headers=headers, **kwargs)

    body = {"model": "alpha", "prompt": "hi"}
    for path in ("/v1/models", "/v1/adapters", "/v1/metadata", "/v1/metrics"):
        assert call(path).status_code == 401
        assert call(path, "wrong").status_code == 401
    assert call("/v1/completions", method="POST", json=body).status_code == 401
    reply = call("/v1/completions", "wrong", method="POST", json=body)
    assert reply.status_code == 401 and "Authorization: Bearer" in reply.json()["error"]["message"]
    assert call("/v1/health/live").status_code == 200
    assert call("/v1/health/ready").status_code == 200
    assert call("/v1/models", "k2").status_code == 200
    state.client_headers = {"Authorization": "Bearer backend-key"}
    reply = call("/v1/completions", "k1", method="POST", json=body)
    assert reply.status_code == 200
    assert reply.json()["authorization_seen"] == "Bearer backend-key"  # ours, not the client's


# ---- routing decisions: `resolve` alone, no app, no backend ----

class Lookup:
    """The registry's read side over fixed records (what `resolve` may see)."""

    def __init__(self, *records: AdapterRecord) -> None:
        self.records = {r.name: r for r in records}

    def get(self, name):
        return self.records.get(name)

    def ready(self, name):
        record = self.records.get(name)
        return record if record is not None and record.servable else None


ADAPTERS = Lookup(
    AdapterRecord(name="alpha", state=State.READY, loaded_path=Path("/snap/alpha-1")),
    AdapterRecord(name="swapping", state=State.LOADING, loaded_path=Path("/snap/swapping-1")),
    AdapterRecord(name="copying", state=State.PENDING, reason="incomplete: still copying"),
    AdapterRecord(name="first", state=State.LOADING),
    AdapterRecord(name="big", state=State.FAILED, reason="rank 64 is above 16"),
    AdapterRecord(name="going", state=State.REMOVING, reason="folder deleted"),
)


def decide(body, *, backend=None, static_mode=False, adapters=ADAPTERS):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return resolve(read_facts(raw), served_name="tiny", adapters=adapters,
                   static_mode=static_mode, request_model=(backend or VLLMBackend()).request_model)


@pytest.mark.parametrize("model", [None, "tiny", ""])
def test_resolve_sends_the_base_model_through_untouched(model):
    raw = json.dumps({"model": model, "prompt": "hi"}).encode()
    assert decide(raw) == Target(model=model, adapter="", rename=None)
    assert decide(b'{"prompt": "hi"}') == Target(model=None, adapter="", rename=None)


@pytest.mark.parametrize(("model", "adapter"), [("alpha", "alpha"), ("swapping", "swapping")])
def test_resolve_sends_a_served_adapter_under_the_name_vllm_knows(model, adapter):
    raw = json.dumps({"model": model, "prompt": "hi"}).encode()
    assert decide(raw) == Target(model=model, adapter=adapter, rename=None)


def test_resolve_renames_only_when_the_backend_wants_another_name():
    raw = json.dumps({"model": "tiny:alpha", "prompt": "hi", "max_tokens": 3}).encode()
    target = decide(raw)
    assert isinstance(target, Target)
    assert (target.model, target.adapter, target.rename) == ("tiny:alpha", "alpha", "alpha")
    assert json.loads(renamed(raw, target.rename)) == {"model": "alpha", "prompt": "hi",
                                                       "max_tokens": 3}
    sglang = SGLangBackend()
    raw = json.dumps({"model": "alpha", "prompt": "hi"}).encode()
    target = decide(raw, backend=sglang)
    assert isinstance(target, Target) and target.adapter == "alpha"
    assert json.loads(renamed(raw, target.rename)) == {"model": "tiny:alpha", "prompt": "hi"}
    raw = b'{"model": "tiny:alpha", "prompt": "hi"}'
    assert decide(raw, backend=sglang) == Target(model="tiny:alpha", adapter="alpha",
                                                 rename=None)


@pytest.mark.parametrize(("model", "adapter", "message"), [
    ("zeta", "(unknown)", "The model 'zeta' does not exist."),
    ("tiny:zeta", "(unknown)", "The model 'tiny:zeta' does not exist."),
    ("tiny:", "(unknown)", "The model 'tiny:' does not exist."),
    ("copying", "copying", "The adapter 'copying' is not ready yet: incomplete: still copying."),
    ("first", "first", "The adapter 'first' is still loading; try again in a moment."),
    ("tiny:big", "big", "The adapter 'big' failed to load: rank 64 is above 16."),
    ("going", "going", "The adapter 'going' is being removed."),
])
def test_resolve_says_why_a_name_cannot_be_used_now(model, adapter, message):
    assert decide({"model": model, "prompt": "hi"}) == Refusal(
        404, message, "NotFoundError", "model_not_found", model=model, adapter=adapter)


def test_resolve_in_static_mode_says_new_adapters_need_a_restart():
    refusal = decide({"model": "zeta"}, static_mode=True)
    assert isinstance(refusal, Refusal) and refusal.message == (
        "The model 'zeta' does not exist. (static mode: adapters added after start need a "
        "restart)")
    failed = decide({"model": "big"}, static_mode=True)  # a known name says its own reason
    assert isinstance(failed, Refusal) and "static mode" not in failed.message


@pytest.mark.parametrize(("body", "message", "model"), [
    (b"{not json", "Request body is not valid JSON.", None),
    (b"\xff", "Request body is not valid JSON.", None),
    (b"[1, 2]", "Request body must be a JSON object.", None),
    (b'"tiny"', "Request body must be a JSON object.", None),
    ({"model": 7}, "'model' must be a string.", 7),
    ({"model": ["alpha"]}, "'model' must be a string.", ["alpha"]),
    ({"model": "alpha", "lora_path": "/etc"}, "'lora_path' is not accepted: name the adapter in "
     "'model' ('<adapter>' or 'tiny:<adapter>').", "alpha"),
    ({"lora_path": "/etc"}, "'lora_path' is not accepted", None),
])
def test_resolve_refuses_bad_bodies_with_a_400(body, message, model):
    refusal = decide(body)
    assert isinstance(refusal, Refusal)
    assert (refusal.status, refusal.kind, refusal.code) == (400, "BadRequestError", None)
    assert refusal.message.startswith(message)
    assert (refusal.model, refusal.adapter) == (model, "")


def test_a_refusal_renders_as_an_openai_error():
    refusal = decide({"model": "zeta"})
    assert isinstance(refusal, Refusal)
    response = refusal.response()
    assert response.status_code == 404
    assert json.loads(response.body) == {"error": {
        "message": "The model 'zeta' does not exist.", "type": "NotFoundError", "param": None,
        "code": "model_not_found"}}
    bad = decide(b"[]")
    assert isinstance(bad, Refusal) and json.loads(bad.response().body)["error"]["code"] == 400


@pytest.mark.parametrize("removed", [False, True])
def test_a_request_held_at_the_gate_is_served_or_refused_when_it_opens(upstream, removed):
    state = make_state(upstream)

    async def go() -> httpx.Response:
        state.client = Upstream(upstream, read_timeout=5, connect_timeout=2)
        try:
            transport = httpx.ASGITransport(app=build_app(state))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                async with state.traffic.exclusive("alpha", timeout=1):
                    held = asyncio.create_task(client.post(
                        "/v1/completions", json={"model": "alpha", "prompt": "hi"}))
                    await asyncio.sleep(0.2)
                    assert not held.done()  # waits while the weights are swapped
                    if removed:
                        state.registry = Registry()  # gone while the request waited
                return await held
        finally:
            await state.client.close()

    reply = asyncio.run(go())
    if removed:
        assert reply.status_code == 404
        assert reply.json()["error"]["message"] == "The model 'alpha' does not exist."
    else:
        assert reply.status_code == 200 and reply.json()["model"] == "alpha"
    assert state.traffic.running("alpha") == 0
    assert 'lora_requests_total{adapter="alpha"} 1.0' in state.metrics.render().decode()


@pytest.mark.parametrize(("value", "expected"), [
    (True, True), (1, True), ("true", True), ("yes", True), ("On", True), (False, False),
    (0, False), ("no", False), (None, False), (2, False), ([], False), (1.0, False)])
def test_load_inplace_is_read_as_vllm_reads_it(value, expected):
    from entrypoint.backends.vllm import lax_bool

    assert lax_bool(value) is expected


def test_a_connection_the_backend_closes_as_it_is_reused_is_retried_once():
    """vLLM's keep-alive timer can close an idle pooled connection just as it is reused (its
    event loop starved by the engine): that request never reached it, so it is sent again."""

    async def scenario() -> tuple[int, int]:
        seen = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal seen
            await reader.readuntil(b"\r\n\r\n")
            seen += 1
            if seen > 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Upstream(f"http://127.0.0.1:{port}")
        try:
            response = await client.send("POST", "/v1/completions", body=b"{}")
            status = response.status
            await response.read()
        finally:
            await client.close()
            server.close()
        return status, seen

    assert asyncio.run(scenario()) == (200, 2)


# ---- hostile or careless clients, on a real socket ----

class LiveGateway:
    """The gateway served by uvicorn as `serve` runs it (same protocol and options), in a
    thread of its own, on a free port."""

    def __init__(self, state: GatewayState) -> None:
        import threading

        import uvicorn

        from entrypoint.runtime.net import GATEWAY_SERVER_OPTIONS, GatewayServer

        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(state), host="127.0.0.1", port=self.port,
                                **GATEWAY_SERVER_OPTIONS)
        self.server = GatewayServer(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.02)
        raise AssertionError("the gateway did not start")

    def _run(self) -> None:
        async def main() -> None:
            url, timeout = self.state.upstream
            self.state.client = Upstream(url, read_timeout=timeout, connect_timeout=2)
            try:
                await self.server.serve()
            finally:
                await self.state.client.close()
                self.state.parser.close()

        asyncio.run(main())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live(upstream):
    gateway = LiveGateway(make_state(upstream, timeout=60))
    yield gateway
    gateway.stop()


def busy(upstream) -> int:
    return httpx.get(upstream + "/__busy").json()["busy"]


def test_a_client_hanging_up_on_a_plain_request_stops_the_backend(live, upstream):
    """Only streams used to watch for the client going away: a non-streamed request whose
    client left kept the backend generating (vLLM: 8 such requests, busy 16.8 s after)."""
    for _ in range(4):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", timeout=0.5,
                       json={"model": "alpha", "prompt": "hang", "max_tokens": 480})
    took = wait_until(lambda: busy(upstream) == 0, timeout=5)
    assert took < 2.0, f"the backend kept working {took:.1f} s after its clients left"
    assert live.state.traffic.running("alpha") == 0
    assert 'lora_request_errors_total{adapter="alpha",status="499"} 4.0' in (
        live.state.metrics.render().decode())


def test_model_names_clients_make_up_never_grow_metrics_or_log_lines(upstream, caplog):
    caplog.set_level(logging.INFO, logger="entrypoint.access")
    state = make_state(upstream)
    complete(state, "alpha")

    def series() -> list[str]:
        return [line for line in state.metrics.render().decode().splitlines()
                if line.startswith("lora_request")]

    known = series()
    for i in range(200):
        complete(state, f"made-up-{i}")
    grown = series()
    assert not any("made-up" in line for line in grown)
    # (unknown) in the requests and errors counters, each with its _created: and no more
    assert len(grown) - len(known) == 4
    for i in range(100):
        complete(state, f"more-{i}")
    assert len(series()) == len(grown)
    huge = "x" * (1 << 20)
    reply = complete(state, huge)
    assert reply.status_code == 404 and len(reply.text) < 1000
    line = caplog.records[-1].getMessage()
    assert len(line) < 1000 and "made-up" not in line


def test_a_huge_nested_body_does_not_stall_the_port(live):
    """A body of millions of nested lists took seconds to parse, all on the event loop: health
    checks waited 8 s for one such body, 40 s for four."""
    import concurrent.futures

    # 4.4 MB each: parsed on the event loop, one held it 1.3 s here (the port was closed)
    raw = b'{"model": "zeta", "x": [' + b",".join([b"[[[[[[[[[[]]]]]]]]]]"] * 200_000) + b"]}"
    assert len(raw) > 4 << 20

    def send() -> int:
        return httpx.post(live.url + "/v1/completions", content=raw, timeout=120,
                          headers={"content-type": "application/json"}).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(send) for _ in range(4)]
        slowest = 0.0
        while not all(f.done() for f in sent):
            started = time.monotonic()
            assert httpx.get(live.url + "/v1/health/live", timeout=30).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
        assert [f.result() for f in sent] == [404] * 4
    assert slowest < 0.5, f"/v1/health/live took {slowest:.2f} s while bodies were parsed"


def test_nesting_deeper_than_the_parser_allows_is_a_400(upstream):
    deep = b'{"model": "alpha", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = run(make_state(upstream), "POST", "/v1/completions", content=deep,
                headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "Request body is nested too deeply."


def test_an_empty_model_is_the_base_model_as_in_vllm(upstream):
    reply = complete(make_state(upstream), "")
    assert reply.status_code == 200 and reply.json()["model"] == ""


def test_repeated_headers_are_read_as_vllm_reads_them(upstream):
    state = make_state(upstream)
    state.api_keys = ("right",)
    body = json.dumps({"model": "alpha", "prompt": "hi"}).encode()

    def send(*headers: tuple[str, str]) -> httpx.Response:
        return run(state, "POST", "/v1/completions", content=body, headers=list(headers))

    assert send(("authorization", "Bearer right"), ("authorization", "Bearer wrong"),
                ("content-type", "application/json")).status_code == 200
    assert send(("authorization", "Bearer wrong"), ("authorization", "Bearer right"),
                ("content-type", "application/json")).status_code == 401
    reply = send(("authorization", "Bearer right"), ("content-type", "application/json"),
                 ("content-type", "text/plain"))
    assert reply.json()["content_type_seen"] == "application/json"  # both sent, first read


def test_request_headers_that_trickle_in_are_cut_off(live, monkeypatch):
    import socket

    from entrypoint.gateway.http import HeaderDeadlineProtocol

    monkeypatch.setattr(HeaderDeadlineProtocol, "header_timeout", 0.5)
    with socket.create_connection(("127.0.0.1", live.port)) as slow, \
            socket.create_connection(("127.0.0.1", live.port)) as silent:
        slow.sendall(b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for sock in (slow, silent):
            sock.settimeout(5)
            answer = sock.recv(1000)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert sock.recv(1000) == b""  # and closed
        assert time.monotonic() - started < 2
    assert httpx.get(live.url + "/v1/health/live").status_code == 200  # others unaffected
