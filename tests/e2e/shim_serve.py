"""`lora-entrypoint serve` with its admin calls routed through a fault-injecting HTTP shim.

Test-only. The service, reconciler, supervisor and vLLM are the real ones; only the client that
probes, lists, loads and unloads talks to the shim, which forwards to vLLM unless told to fail.
Run as `python -m tests.e2e.shim_serve` with the NIM_* variables and SHIM_PORT set.
Control: `POST /__faults` {"path", "status", "delay", "times", "lora_name"}; `DELETE /__faults`
drops the ones not used up; `GET /__calls`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from entrypoint.config.settings import load_settings
from entrypoint.logs import setup_logging
from entrypoint.runtime.net import GatewayServer
from entrypoint.runtime.service import Service
from entrypoint.runtime.startup import private_folder, resolve, snapshot_store


def build_shim(upstream: str, uds: str | None = None) -> Starlette:
    faults: list[dict] = []
    calls: list[dict] = []
    client = httpx.AsyncClient(base_url=upstream, timeout=60, transport=httpx.AsyncHTTPTransport(
        uds=uds) if uds else None)

    async def set_faults(request: Request) -> Response:
        if request.method == "DELETE":
            faults.clear()
        else:
            faults.append(await request.json())
        return JSONResponse({"faults": faults})

    async def get_calls(request: Request) -> Response:
        return JSONResponse(calls)

    async def forward(request: Request) -> Response:
        body = await request.body()
        name = None
        if body:
            try:
                name = json.loads(body).get("lora_name")
            except (ValueError, AttributeError):
                pass
        now = asyncio.get_running_loop().time()
        call = {"path": request.url.path, "lora_name": name, "time": now}
        calls.append(call)
        for fault in faults:
            if fault.get("times", 0) <= 0 or fault["path"] != request.url.path:
                continue
            if fault.get("lora_name") not in (None, name):
                continue
            fault["times"] -= 1
            await asyncio.sleep(fault.get("delay", 0))
            if fault.get("status"):
                call["status"] = fault["status"]
                return JSONResponse({"error": {"message": "injected fault", "type": "Internal",
                                               "code": fault["status"]}},
                                    status_code=fault["status"])
        headers = {"content-type": "application/json"}
        if "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        try:
            upstream = await client.request(request.method, request.url.path, content=body,
                                            headers=headers)
        except httpx.HTTPError as exc:  # vLLM not up yet, or gone: what a proxy would say
            call["status"] = 502
            return JSONResponse({"error": {"message": f"shim: {type(exc).__name__}"}},
                                status_code=502)
        call["status"] = upstream.status_code
        return Response(upstream.content, status_code=upstream.status_code,
                        media_type=upstream.headers.get("content-type"))

    return Starlette(routes=[
        Route("/__faults", set_faults, methods=["POST", "DELETE"]),
        Route("/__calls", get_calls, methods=["GET"]),
        Route("/{path:path}", forward, methods=["GET", "POST"]),
    ])


def main() -> int:
    settings = load_settings()
    setup_logging(settings.log_level)
    store = snapshot_store(settings)
    startup = resolve(settings, snapshots=store, private=private_folder())
    shim_port = int(os.environ["SHIM_PORT"])

    async def run() -> int:
        service = Service(startup, host="127.0.0.1", snapshots=store)
        service.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{shim_port}",
                                           timeout=service.client.timeout,
                                           headers=service.client.headers)
        if service.reconciler is not None:
            service.reconciler.client = service.client
        shim = GatewayServer(uvicorn.Config(
            build_shim(startup.plan.backend_url, startup.plan.uds), host="127.0.0.1",
            port=shim_port, log_config=None, access_log=False, lifespan="off"))
        task = asyncio.create_task(shim.serve())
        try:
            return await service.run()
        finally:
            shim.should_exit = True
            await asyncio.wait({task}, timeout=5)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
