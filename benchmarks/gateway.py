"""Gateway benchmark: direct to the backend against through the public port, in one run.

Against a fast stand-in upstream (our own cost) and the real vLLM CPU build (what users feel):
median and p99 latency of small non-streaming requests, requests per second at 1, 8 and 32
concurrent clients, and time to the first streamed chunk.

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
    from entrypoint.gateway import GatewayState, build_app
    from entrypoint.metrics import Metrics
    from entrypoint.registry import AdapterRecord, Registry, State
    from entrypoint.service import GATEWAY_SERVER_OPTIONS, _GatewayServer, listen, proxy_client

    registry = Registry()
    registry.put(AdapterRecord(name="alpha", state=State.READY, source=Path("/loras/alpha"),
                               loaded_path=Path("/snapshots/alpha")))
    state = GatewayState(served_name="tiny", backend=VLLMBackend(), registry=registry,
                         client=proxy_client(upstream), readiness=lambda: None, backend_up=True,
                         metrics=Metrics(registry))
    # Exactly as `serve` runs it: our own listening socket, uvicorn on it.
    server = _GatewayServer(uvicorn.Config(build_app(state), **GATEWAY_SERVER_OPTIONS))
    asyncio.run(server.serve(sockets=[listen("127.0.0.1", port)]))


# ---- measuring ----

async def latencies(url: str, count: int) -> list[float]:
    async with aiohttp.ClientSession() as session:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", json=BODY) as response:
                await response.read()
                assert response.status == 200, response.status
            out.append(time.perf_counter() - start)
        return out


async def throughput(url: str, clients: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(url + "/v1/completions", json=BODY) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.perf_counter() - start)


async def first_chunk(url: str, count: int, tokens: int) -> list[float]:
    body = {**BODY, "max_tokens": tokens, "stream": True}
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as response:
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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def compare(direct: str, public: str, *, requests: int, seconds: float, ttft: int,
            tokens: int, pids: dict[str, int | None] | None = None) -> dict:
    result: dict = {}
    for url in (direct, public):
        asyncio.run(latencies(url, 20))  # warm up connections and caches
    lat = {label: asyncio.run(latencies(url, requests))
           for label, url in (("direct", direct), ("gateway", public))}
    result["latency_ms"] = {
        label: {"median": round(statistics.median(v) * 1000, 3),
                "p99": round(pct(v, 0.99) * 1000, 3)} for label, v in lat.items()}
    result["added_median_ms"] = round(
        result["latency_ms"]["gateway"]["median"] - result["latency_ms"]["direct"]["median"], 3)
    result["rps"] = {}
    for clients in (1, 8, 32):
        direct_rps = asyncio.run(throughput(direct, clients, seconds))
        public_rps = asyncio.run(throughput(public, clients, seconds))
        result["rps"][str(clients)] = {"direct": round(direct_rps, 1),
                                       "gateway": round(public_rps, 1),
                                       "ratio": round(public_rps / direct_rps, 3)}
    if pids:
        gateway_pid = pids.pop("gateway")
        result["cpu_at_32_clients"] = {
            "direct": cpu_profile(direct, 32, seconds, dict(pids)),
            "gateway": cpu_profile(public, 32, seconds, {**pids, "gateway": gateway_pid}),
        }
    first = {label: asyncio.run(first_chunk(url, ttft, tokens))
             for label, url in (("direct", direct), ("gateway", public))}
    result["first_chunk_ms"] = {label: {"median": round(statistics.median(v) * 1000, 3),
                                        "p99": round(pct(v, 0.99) * 1000, 3)}
                                for label, v in first.items()}
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
                       tokens=4, pids=pids)
    finally:
        for process in (gateway, upstream):
            process.kill()
            process.wait()


def vllm_run(args: argparse.Namespace) -> dict:
    import re

    from entrypoint.demo import build_adapter, build_base_model
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
                     }, work / "serve.log").start().wait_ready()
    try:
        port = re.search(r"--port (\d+)", server.logs()).group(1)
        return compare(f"http://127.0.0.1:{port}", server.url, requests=args.vllm_requests,
                       seconds=args.vllm_seconds, ttft=30, tokens=8)
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-gateway", nargs=2, metavar=("UPSTREAM", "PORT"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gateway.json")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--vllm-requests", type=int, default=100)
    parser.add_argument("--vllm-seconds", type=float, default=8.0)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway[0], int(args.serve_gateway[1]))
        return
    result = {"machine": {"cpus": os.cpu_count()}, "standin": standin_run(args)}
    print(json.dumps(result, indent=1), flush=True)
    if not args.skip_vllm:
        result["vllm_cpu"] = vllm_run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
