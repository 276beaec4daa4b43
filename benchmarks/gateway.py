"""Gateway benchmark: direct to the backend against through the public port, in one run.

Against a fast stand-in upstream (our own cost) and the real vLLM CPU build (what users feel):
median and p99 latency of small non-streaming requests, requests per second at 1, 8 and 32
concurrent clients, and time to the first streamed chunk; on vLLM also streamed tokens/s at 8 and
32 concurrent streams and the CPU each process spends per streamed chunk; with `--start`, `serve`
to ready against the same vLLM command started bare. Direct and through alternate in pairs; the
ratios reported are medians over the pairs.

Run: `.venv/bin/python -m benchmarks.gateway [--out benchmarks/results/gateway.json]`.
`--serve-gateway UPSTREAM PORT` (internal) runs the gateway alone in front of UPSTREAM, configured
as `serve` configures it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "alpha", "prompt": "Hello", "max_tokens": 1, "temperature": 0}


# ---- the gateway alone, in front of the stand-in ----

def serve_gateway(upstream: str, port: int) -> None:
    import uvicorn

    from entrypoint.backends.vllm import VLLMBackend
    from entrypoint.gateway.app import build_app
    from entrypoint.gateway.state import GatewayState
    from entrypoint.metrics import Metrics
    from entrypoint.reconcile.registry import AdapterRecord, Registry, State
    from entrypoint.runtime.net import (
        GATEWAY_SERVER_OPTIONS,
        GatewayServer,
        listen,
        proxy_client,
        run_event_loop,
    )

    registry = Registry()
    registry.put(AdapterRecord(name="alpha", state=State.READY, source=Path("/loras/alpha"),
                               loaded_path=Path("/snapshots/alpha")))
    state = GatewayState(served_name="tiny", backend=VLLMBackend(), registry=registry,
                         client=proxy_client(upstream), readiness=lambda: None, backend_up=True,
                         metrics=Metrics(registry))
    # Exactly as `serve` runs it: our own listening socket, uvicorn on it.
    server = GatewayServer(uvicorn.Config(build_app(state), **GATEWAY_SERVER_OPTIONS))

    async def main() -> int:
        await server.serve(sockets=[listen("127.0.0.1", port)])
        return 0

    run_event_loop(main())


# ---- measuring ----

def session(url: str, limit: int = 100) -> tuple[aiohttp.ClientSession, str]:
    """A client session for `url` and the base URL to prefix paths with: `unix:PATH` is the
    backend's own Unix socket (vLLM listens on one, past the entrypoint)."""
    if url.startswith("unix:"):
        return (aiohttp.ClientSession(connector=aiohttp.UnixConnector(url[5:], limit=limit)),
                "http://backend")
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)), url


async def latencies(url: str, count: int) -> list[float]:
    client, url = session(url)
    async with client as session_:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            async with session_.post(url + "/v1/completions", json=BODY) as response:
                await response.read()
                assert response.status == 200, response.status
            out.append(time.perf_counter() - start)
        return out


async def throughput(url: str, clients: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    pool, url = session(url, clients)
    async with pool as session_:
        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session_.post(url + "/v1/completions", json=BODY) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def first_chunk(url: str, count: int, tokens: int) -> list[float]:
    body = {**BODY, "max_tokens": tokens, "stream": True}
    out = []
    pool, url = session(url)
    async with pool as session_:
        for _ in range(count):
            start = time.perf_counter()
            async with session_.post(url + "/v1/completions", json=body) as response:
                async for _chunk in response.content.iter_any():
                    out.append(time.perf_counter() - start)
                    break
                await response.read()
    return out


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (this one when `pid` is None)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_profile(url: str, clients: int, seconds: float, pids: dict[str, int | None]) -> dict:
    """Throughput plus the CPU each process spent per request: where the time goes."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    rps = asyncio.run(throughput(url, clients, seconds))
    wall = time.perf_counter() - start
    done = rps * wall
    return {"rps": round(rps, 1), "cpu_ms_per_request": {
        name: round((cpu_seconds(pid) - before[name]) / done * 1000, 3)
        for name, pid in pids.items()}}


RETRIES: dict[str, int] = {}  # streamed requests sent again after a connection error, by URL


async def stream_run(url: str, streams: int, tokens: int, rounds: int) -> tuple[int, float]:
    """`streams` concurrent clients, each streaming `rounds` completions of `tokens` tokens:
    the streamed chunks (SSE events with text) received and the seconds it took."""
    body = {"model": "alpha", "prompt": "Hi", "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    chunks = 0
    label = url
    pool, url = session(url, streams)
    async with pool as session_:
        async def client() -> None:
            nonlocal chunks
            for _ in range(rounds):
                for attempt in range(3):  # a pooled connection the server had just closed
                    try:
                        async with session_.post(url + "/v1/completions",
                                                 json=body) as response:
                            assert response.status == 200, response.status
                            async for line in response.content:
                                if line.startswith(b"data: {"):
                                    chunks += 1
                        break
                    except aiohttp.ClientConnectionError:
                        RETRIES[label] = RETRIES.get(label, 0) + 1
                        if attempt == 2:
                            raise

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
        return chunks, time.perf_counter() - start


def streaming(direct: str, public: str, *, pairs: int, tokens: int, pids: dict[str, int | None],
              concurrency: tuple[int, ...] = (8, 32)) -> dict:
    """Streamed tokens/s direct and through the port, alternating, and the CPU per streamed
    chunk of each process while streaming through the port."""
    out: dict = {}
    asyncio.run(stream_run(direct, 2, tokens, 1))  # warm up
    asyncio.run(stream_run(public, 2, tokens, 1))
    for streams in concurrency:
        rounds = max(1, 256 // streams)  # 256 completions a run: long enough to average out
        runs: list[dict] = []
        for _ in range(pairs):
            pair: dict = {}
            for label, url in (("direct", direct), ("gateway", public)):
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                count, took = asyncio.run(stream_run(url, streams, tokens, rounds))
                cpu = {name: (cpu_seconds(pid) - before[name]) / count * 1e6
                       for name, pid in pids.items()}
                pair[label] = {"tokens_per_s": round(count / took, 1),
                               "cpu_us_per_chunk": {k: round(v, 1) for k, v in cpu.items()}}
            pair["ratio"] = round(pair["gateway"]["tokens_per_s"]
                                  / pair["direct"]["tokens_per_s"], 3)
            through = pair["gateway"]["cpu_us_per_chunk"]
            pair["entrypoint_over_vllm_api_server_cpu"] = round(
                through["entrypoint"] / through["vllm_api_server"], 3)
            runs.append(pair)
        out[str(streams)] = {
            "pairs": runs,
            "client_retries": {"direct": RETRIES.pop(direct, 0),
                               "gateway": RETRIES.pop(public, 0)},
            "median_ratio": statistics.median(r["ratio"] for r in runs),
            "median_cpu_ratio": statistics.median(
                r["entrypoint_over_vllm_api_server_cpu"] for r in runs)}
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compare(direct: str, public: str, *, requests: int, seconds: float, ttft: int,
            tokens: int, pids: dict[str, int | None] | None = None, pairs: int = 3) -> dict:
    result: dict = {}
    for url in (direct, public):
        asyncio.run(latencies(url, 20))  # warm up connections and caches
    lat: dict[str, list[float]] = {"direct": [], "gateway": []}
    added = []
    for _ in range(pairs):  # alternating pairs; the added latency is the median over them
        medians = {}
        for label, url in (("direct", direct), ("gateway", public)):
            values = asyncio.run(latencies(url, requests // pairs))
            lat[label] += values
            medians[label] = statistics.median(values)
        added.append(medians["gateway"] - medians["direct"])
    result["latency_ms"] = {
        label: {"median": round(statistics.median(v) * 1000, 3),
                "p99": round(pct(v, 0.99) * 1000, 3)} for label, v in lat.items()}
    result["added_median_ms"] = round(statistics.median(added) * 1000, 3)
    result["rps"] = {}
    for clients in (1, 8, 32):
        ratios, direct_rps, public_rps = [], [], []
        for _ in range(pairs):
            direct_rps.append(asyncio.run(throughput(direct, clients, seconds / pairs)))
            public_rps.append(asyncio.run(throughput(public, clients, seconds / pairs)))
            ratios.append(public_rps[-1] / direct_rps[-1])
        result["rps"][str(clients)] = {"direct": round(statistics.median(direct_rps), 1),
                                       "gateway": round(statistics.median(public_rps), 1),
                                       "ratio": round(statistics.median(ratios), 3)}
    if pids:
        gateway_pid = pids.pop("gateway")
        result["cpu_at_32_clients"] = {
            "direct": cpu_profile(direct, 32, seconds, dict(pids)),
            "gateway": cpu_profile(public, 32, seconds, {**pids, "gateway": gateway_pid}),
        }
    first: dict[str, list[float]] = {"direct": [], "gateway": []}
    added = []
    for _ in range(pairs):
        medians = {}
        for label, url in (("direct", direct), ("gateway", public)):
            values = asyncio.run(first_chunk(url, max(1, ttft // pairs), tokens))
            first[label] += values
            medians[label] = statistics.median(values)
        added.append(medians["gateway"] - medians["direct"])
    result["first_chunk_ms"] = {label: {"median": round(statistics.median(v) * 1000, 3),
                                        "p99": round(pct(v, 0.99) * 1000, 3)}
                                for label, v in first.items()}
    result["first_chunk_added_median_ms"] = round(statistics.median(added) * 1000, 3)
    return result


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(url)


def free_port() -> int:
    from tests.e2e.server import free_port as pick

    return pick()


def standin_run(args: argparse.Namespace) -> dict:
    upstream_port, gateway_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstream", "--port",
                                 str(upstream_port), "--adapters", "alpha"], cwd=ROOT)
    direct = f"http://127.0.0.1:{upstream_port}"
    gateway = subprocess.Popen([sys.executable, "-m", "benchmarks.gateway", "--serve-gateway",
                                direct, str(gateway_port)], cwd=ROOT)
    public = f"http://127.0.0.1:{gateway_port}"
    try:
        wait_http(direct + "/health")
        wait_http(public + "/v1/health/live")
        pids = {"load_generator": None, "upstream": upstream.pid, "gateway": gateway.pid}
        return compare(direct, public, requests=args.requests, seconds=args.seconds, ttft=200,
                       tokens=4, pids=pids, pairs=args.pairs)
    finally:
        for process in (gateway, upstream):
            process.kill()
            process.wait()


def vllm_run(args: argparse.Namespace) -> dict:
    from lora_demo import build_adapter, build_base_model
    from tests.e2e.server import Server

    assets = ROOT / ".cache" / "test-assets"
    model = build_base_model(assets / "tiny-llama")
    library = assets / "library"
    build_adapter(model, library / "alpha", seed=11)
    work = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    loras = work / "loras"
    loras.mkdir()
    subprocess.run(["cp", "-r", str(library / "alpha"), str(loras / "alpha")], check=True)
    server = Server({"NIM_MODEL_NAME": str(model), "NIM_SERVED_MODEL_NAME": "tiny",
                     "NIM_PEFT_SOURCE": str(loras), "NIM_PEFT_REFRESH_INTERVAL": "60",
                     }, work / "serve.log",
                    # this tree's code (the benchmark can run from another checkout)
                    command=[sys.executable, "-m", "entrypoint", "serve", "--host", "127.0.0.1"],
                    ).start().wait_ready()
    try:
        direct = f"unix:{server.backend_socket()}"  # vLLM's own socket, past the entrypoint
        result = compare(direct, server.url, requests=args.vllm_requests,
                         seconds=args.vllm_seconds, ttft=30, tokens=8)
        assert server.process is not None
        pids = {"entrypoint": server.process.pid,
                "vllm_api_server": find_backend(server.process.pid), "load_generator": None}
        result["streaming_64_tokens"] = streaming(direct, server.url, pairs=args.pairs,
                                                  tokens=64, pids=pids)
        return result
    finally:
        server.terminate()


def start_run(args: argparse.Namespace) -> dict:
    """`serve` to `/v1/health/ready` against the same vLLM command (the launch plan's argv and
    environment) started bare to its `/health`, alternating, static and dynamic, with 100
    adapters present."""
    from entrypoint.config.settings import load_settings
    from entrypoint.runtime.startup import resolve
    from lora_demo import build_adapter, build_base_model
    from tests.e2e.server import Server, clean_env

    assets = ROOT / ".cache" / "test-assets"
    model = build_base_model(assets / "tiny-llama")
    build_adapter(model, assets / "library" / "alpha", seed=11)
    work = Path(tempfile.mkdtemp(prefix="gw-start-"))
    loras = work / "loras"
    loras.mkdir()
    for i in range(100):
        subprocess.run(["cp", "-r", str(assets / "library" / "alpha"), str(loras / f"a{i:03d}")],
                       check=True)
    out: dict = {}
    for mode, extra in (("static", {}), ("dynamic", {"NIM_PEFT_REFRESH_INTERVAL": "60"})):
        env = {"NIM_MODEL_NAME": str(model), "NIM_SERVED_MODEL_NAME": "tiny",
               "NIM_PEFT_SOURCE": str(loras), "NIM_MAX_MODEL_LEN": "512", **extra}
        runs = []
        for i in range(args.pairs):
            server = Server(env, work / f"serve-{mode}-{i}.log").start()
            server.wait_ready()
            ours = server.ready_after
            server.terminate()
            private = Path(tempfile.mkdtemp(prefix="gw-bare-"))
            saved = dict(os.environ)
            os.environ.update(clean_env(**env, NIM_SERVER_PORT=str(free_port())))
            try:
                plan = resolve(load_settings(), dry_run=True, private=private).plan
            finally:
                os.environ.clear()
                os.environ.update(saved)
            with (work / f"bare-{mode}-{i}.log").open("wb") as log:
                started = time.monotonic()
                bare = subprocess.Popen(plan.argv, env={**clean_env(**env), **plan.env},
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                try:
                    wait_http_ok(plan.backend_url + "/health", 300, bare, uds=plan.uds)
                    theirs = time.monotonic() - started
                finally:
                    os.killpg(bare.pid, 15)
                    bare.wait(60)
            runs.append({"serve_s": round(ours, 2), "bare_vllm_s": round(theirs, 2),
                         "added_s": round(ours - theirs, 2)})
        out[mode] = {"pairs": runs,
                     "median_added_s": statistics.median(r["added_s"] for r in runs)}
    return out


def wait_http_ok(url: str, timeout: float, process: subprocess.Popen,
                 uds: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    client = httpx.Client(transport=httpx.HTTPTransport(uds=uds) if uds else None, timeout=2)
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            if client.get(url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def find_backend(parent: int) -> int:
    from tests.e2e.server import find_backend as find

    return find(parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-gateway", nargs=2, metavar=("UPSTREAM", "PORT"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gateway.json")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--vllm-requests", type=int, default=100)
    parser.add_argument("--vllm-seconds", type=float, default=8.0)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs per figure")
    parser.add_argument("--start", action="store_true",
                        help="also compare serve's start with bare vLLM's (static, dynamic)")
    parser.add_argument("--only-start", action="store_true", help="only that comparison")
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway[0], int(args.serve_gateway[1]))
        return
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    if args.only_start:
        result["start_100_adapters"] = start_run(args)
        print(json.dumps(result, indent=2))
        return
    result["standin"] = standin_run(args)
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_vllm:
        result["vllm_cpu"] = vllm_run(args)
    if args.start:
        result["start_100_adapters"] = start_run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
