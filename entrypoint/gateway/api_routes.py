"""The runtime adapter API on the public port, in vLLM's form (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`), SGLang's (`/load_lora_adapter`, `/unload_lora_adapter`), Dynamo's
(`/v1/loras`) and AIBrix's runtime form (`/v1/lora_adapter/load`, `/v1/lora_adapter/unload`).

HTTP only: it reads the call's JSON, hands it to `AdapterAPI`, logs the outcome and shapes the
`Answer` as the engine whose form was called would (each engine's wording lives in its module
under `entrypoint.backends`). It decides nothing about adapters itself.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from entrypoint.backends import dynamo, sglang, vllm
from entrypoint.gateway.api import AdapterAPI, Answer, Problem
from entrypoint.gateway.bodies import BadBody, json_object
from entrypoint.gateway.errors import Refusal
from entrypoint.gateway.intake import read_asgi_body
from entrypoint.gateway.state import GatewayState

MAX_API_BODY_BYTES = 64 << 10  # a runtime API call: a name and a path
AIBRIX_HUB = "huggingface://"
access_log = logging.getLogger("entrypoint.access")


class APIRoutes:
    """The four runtime-API routes over a `GatewayState` (its `api`; one that is off when the
    service set none)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def load_vllm(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._vllm_answer(request, body)
        answer = await self.api().load(body.get("lora_name"), body.get("lora_path"),
                                       replace=vllm.lax_bool(body.get("load_inplace")))
        return self._vllm_answer(request, answer, body.get("lora_name"))

    async def unload_vllm(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._vllm_answer(request, body)
        answer = await self.api().unload(body.get("lora_name"))
        return self._vllm_answer(request, answer, body.get("lora_name"))

    async def load_sglang(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._sglang_answer(request, body)
        answer = await self.api().load(body.get("lora_name"), body.get("lora_path"))
        if answer.problem is Problem.ALREADY_LOADED:
            answer = Answer.error(400, sglang.already_loaded(body.get("lora_name")))
        return self._sglang_answer(request, answer, body.get("lora_name"))

    async def unload_sglang(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._sglang_answer(request, body)
        answer = await self.api().unload(body.get("lora_name"))
        if answer.status == 404:  # SGLang answers 400 for a name it does not serve
            answer = Answer.error(400, sglang.not_loaded(body.get("lora_name"),
                                                         self.api().loaded_adapters()))
        return self._sglang_answer(request, answer, body.get("lora_name"))

    async def load_dynamo(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._dynamo_answer(request, body)
        source = body.get("source")
        uri = source.get("uri") if isinstance(source, dict) else None
        answer = await self.api().load(body.get("lora_name"), uri, replace=True,
                                       field="source.uri")
        return self._dynamo_answer(request, answer, body.get("lora_name"))

    async def list_dynamo(self, request: Request) -> Response:
        if (refused := self.api().refusal()) is not None:
            return self._dynamo_answer(request, refused)
        return JSONResponse(dynamo.listing(list(self.api().loaded_adapters())))

    async def unload_dynamo(self, request: Request) -> Response:
        name = request.path_params["name"]
        if (refused := self.api().refusal()) is not None:
            return self._dynamo_answer(request, refused, name)
        answer = await self.api().unload(name)
        if answer.status == 404:
            answer = Answer.error(404, dynamo.not_found(name, list(self.api().loaded_adapters())))
        return self._dynamo_answer(request, answer, name, unloaded=True)

    async def load_aibrix(self, request: Request) -> Response:
        """AIBrix's runtime form: `artifact_url` (`huggingface://` is the Hub's `hf://`)."""
        body = await self._body(request)
        if isinstance(body, Answer):
            return self._vllm_answer(request, body)
        url = body.get("artifact_url")
        if isinstance(url, str) and url.startswith(AIBRIX_HUB):
            url = "hf://" + url[len(AIBRIX_HUB):]
        answer = await self.api().load(body.get("lora_name"), url, field="artifact_url")
        return self._vllm_answer(request, answer, body.get("lora_name"))

    def api(self) -> AdapterAPI:
        """The service's API, or one that is off when it set none."""
        api = self.state.api
        if api is None:
            api = self.state.api = AdapterAPI(
                registry=self.state.registry, served_name=self.state.served_name, source=None,
                reconciler=None, timeout=0, off="this server was started without it")
        return api

    async def _body(self, request: Request) -> dict | Answer:
        """The JSON object of an API call, or why there is none."""
        if (refused := self.api().refusal()) is not None:
            return refused
        raw = await read_asgi_body(request.scope, request.receive, limit=MAX_API_BODY_BYTES)
        if raw is None:
            return Answer.error(400, "The client went away.")
        if isinstance(raw, Refusal):
            return Answer.error(raw.status, raw.message)
        body = json_object(raw)
        return Answer.error(400, body.message) if isinstance(body, BadBody) else body

    def _vllm_answer(self, request: Request, answer: Answer, name: object = None) -> Response:
        log_call(request, answer, name)
        status, body = vllm.api_answer(answer.ok, answer.status, answer.message, answer.kind)
        if isinstance(body, str):
            return PlainTextResponse(body, status_code=status)
        return JSONResponse(body, status_code=status)

    def _dynamo_answer(self, request: Request, answer: Answer, name: object = None, *,
                       unloaded: bool = False) -> Response:
        log_call(request, answer, name)
        return JSONResponse(dynamo.answer(answer.ok, answer.message, name, unloaded=unloaded),
                            status_code=answer.status)

    def _sglang_answer(self, request: Request, answer: Answer, name: object = None) -> Response:
        log_call(request, answer, name)
        status, body = sglang.api_answer(answer.ok, answer.status, answer.message,
                                         self.api().loaded_adapters())
        return JSONResponse(body, status_code=status)


def log_call(request: Request, answer: Answer, name: object) -> None:
    """One access-log line for a runtime-API call (`name`: the `lora_name` it sent)."""
    level = logging.INFO if answer.ok else logging.WARNING
    message = "" if answer.ok else ": " + answer.message.encode("unicode_escape").decode()
    access_log.log(level, "%s %s lora_name=%s status=%d%s", request.method, request.url.path,
                   ascii(name) if isinstance(name, str) else name, answer.status, message,
                   extra={"fields": {"method": request.method, "path": request.url.path,
                                     "lora_name": name, "status": answer.status}})
