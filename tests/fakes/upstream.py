"""A fast stand-in for an OpenAI-compatible backend (tests and benchmarks only).

Answers `/v1/models`, `/v1/completions`, `/v1/chat/completions` (streaming too) and `/metrics`
at once, so what is measured through the gateway is the gateway's own cost. Prompts steer it:
`hang` sleeps 30 s before answering (stopping early, as vLLM does, when its client goes away);
`die` streams two chunks and then drops the connection. `GET /__busy` says how many requests it
is working on.
Run: `python -m tests.fakes.upstream --port N [--served tiny] [--adapters a,b]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def build(served: str, adapters: list[str]) -> Starlette:
    busy = 0

    async def working(request: Request) -> Response:
        return JSONResponse({"busy": busy})

    async def models(request: Request) -> Response:
        cards = [{"id": served, "object": "model", "root": "/models/" + served, "parent": None}]
        cards += [{"id": a, "object": "model", "root": f"/snapshots/{a}", "parent": served}
                  for a in adapters]
        return JSONResponse({"object": "list", "data": cards})

    async def completions(request: Request) -> Response:
        nonlocal busy
        body = json.loads(await request.body())
        prompt = str(body.get("prompt", ""))
        if prompt == "hang":
            busy += 1
            try:
                for _ in range(300):  # vLLM aborts a request whose client went away
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    await asyncio.sleep(0.1)
            finally:
                busy -= 1
        text = f"{body.get('model')} says hi"
        auth = request.headers.get("authorization")
        if body.get("stream"):
            chunks = int(body.get("max_tokens") or 4)

            async def stream():
                for i in range(chunks):
                    if prompt == "die" and i == 2:
                        raise ConnectionError("upstream died")
                    data = {"object": "text_completion", "model": body.get("model"),
                            "choices": [{"index": 0, "text": f" w{i}", "finish_reason": None}]}
                    yield f"data: {json.dumps(data)}\n\n".encode()
                    await asyncio.sleep(float(body.get("delay", 0)))
                yield b"data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        return JSONResponse({"object": "text_completion", "model": body.get("model"),
                             "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                             "authorization_seen": auth,
                             "content_type_seen": request.headers.get("content-type")})

    async def metrics(request: Request) -> Response:
        return Response("# TYPE vllm:num_requests_running gauge\n"
                        'vllm:num_requests_running{model_name="' + served + '"} 0.0\n',
                        media_type="text/plain")

    async def admin(request: Request) -> Response:
        return Response("Success: admin route reached", status_code=200)

    async def locked(request: Request) -> Response:  # a backend that wants a key we lack
        return JSONResponse({"error": "Unauthorized"}, status_code=401)

    return Starlette(routes=[
        Route("/v1/models", models),
        Route("/__busy", working),
        Route("/locked/v1/models", locked),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/v1/load_lora_adapter", admin, methods=["POST"]),
        Route("/health", lambda request: Response("ok")),
        # the rest of vLLM's surface: user-facing routes echo the model they were sent ...
        *[Route(path, completions, methods=["POST"]) for path in (
            "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize", "/v1/messages",
            "/v1/rerank", "/pooling", "/classify")],
        Route("/v1/responses/{id}", lambda request: JSONResponse(
            {"id": request.path_params["id"], "object": "response"})),
        Route("/version", lambda request: JSONResponse({"version": "0.0-fake"})),
        # ... admin ones say they were reached
        *[Route(path, admin, methods=["POST", "DELETE"]) for path in (
            "/adapters", "/adapters/{name}", "/invocations", "/reset_prefix_cache", "/sleep",
            "/wake_up", "/collective_rpc", "/start_profile", "/update_weights",
            "/scale_elastic_ep", "/inference/v1/generate", "/pause")],
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served", default="tiny")
    parser.add_argument("--adapters", default="")
    args = parser.parse_args()
    adapters = [a for a in args.adapters.split(",") if a]
    uvicorn.run(build(args.served, adapters), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
