"""Routing: which backend routes the public port forwards, and where an inference request goes
(the base model or one served adapter) or why it is refused.

Pure decisions over a parsed body and the registry's read side: no I/O, nothing changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from entrypoint.gateway.bodies import BadBody, BodyFacts
from entrypoint.gateway.errors import Refusal
from entrypoint.reconcile.registry import AdapterRecord, State

# The backend's routes this port forwards: an allowlist, not a denylist. Each vLLM release adds
# routes (0.32 lists 40, among them `/collective_rpc`, `/sleep`, `/scale_elastic_ep`, weight
# updates, and SageMaker's `POST /adapters` and `/invocations`, which load an adapter from any
# path or dispatch a body past the checks here). A denylist is only as safe as our reading of
# the newest release; an allowlist fails closed: a route nobody reviewed answers 404.
#: user-facing routes whose JSON body may name a model: routed like completions
MODEL_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                "/v1/messages", "/v1/messages/count_tokens", "/tokenize", "/detokenize",
                "/v1/score", "/v1/rerank", "/score", "/rerank", "/v2/rerank", "/pooling",
                "/classify")
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
#: user-facing routes that name no model: forwarded as they are
PLAIN_ROUTES = (("/v1/responses/{response_id}", "GET"),
                ("/v1/responses/{response_id}/cancel", "POST"),
                ("/health", "GET"), ("/version", "GET"))
MODEL_PATHS = frozenset(MODEL_ROUTES)
PLAIN_PATTERNS = tuple(
    (re.compile(re.sub(r"\{\w+\}", SAFE_SEGMENT.pattern, path)), method)
    for path, method in PLAIN_ROUTES)


def is_model_route(method: str, path: str) -> bool:
    """One of MODEL_ROUTES: routed by the `model` its body names."""
    return method == "POST" and path in MODEL_PATHS


def is_plain_route(method: str, path: str) -> bool:
    """One of PLAIN_ROUTES: forwarded as it is."""
    return any(m == method and pattern.fullmatch(path) for pattern, m in PLAIN_PATTERNS)


class AdapterLookup(Protocol):
    """The registry's read side that routing needs (`Registry` is one)."""

    def get(self, name: str) -> AdapterRecord | None: ...

    def ready(self, name: str) -> AdapterRecord | None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """Where an accepted request goes: the base model (`adapter` "") or one served adapter."""

    #: the client's `model` as sent (None when absent: the base model)
    model: str | None
    #: the adapter it names, "" for the base model
    adapter: str
    #: the `model` the backend needs in the body when it is not the client's (None: the
    #: request's own bytes are forwarded as they are)
    rename: str | None = None


#: the most of a client's text (a model name) that an answer or a log line repeats
SHOWN_CHARS = 256
#: the metric label and log name of every adapter name the service does not know (no adapter
#: name holds parentheses, so it cannot be a real one)
UNKNOWN_ADAPTER = "(unknown)"


def shown(text: object) -> str:
    """Client text as an answer or a log line repeats it: at most SHOWN_CHARS characters, on
    one line (control characters escaped)."""
    value = text if isinstance(text, str) else json.dumps(text)[:SHOWN_CHARS + 1]
    if len(value) > SHOWN_CHARS:
        value = value[:SHOWN_CHARS - 3] + "..."
    return value if value.isprintable() else value.encode("unicode_escape").decode()


def unknown_model(
    model: str | None, name: str, record: AdapterRecord | None, *, static_mode: bool,
) -> Refusal:
    """The 404 for `model` (adapter `name`, whose record is `record`): it says why not now."""
    if record is None:
        message = f"The model '{shown(model)}' does not exist."
        if static_mode:
            message += " (static mode: adapters added after start need a restart)"
    elif record.state is State.PENDING:
        message = f"The adapter '{name}' is not ready yet: {record.reason}."
    elif record.state is State.LOADING:
        message = f"The adapter '{name}' is still loading; try again in a moment."
    elif record.state is State.FAILED:
        message = f"The adapter '{name}' failed to load: {record.reason}."
    elif record.state is State.UNLOADED:
        message = f"The adapter '{name}' was {record.reason}."
    else:
        message = f"The adapter '{name}' is being removed."
    # (a name the service does not know is never a metric label: clients choose it)
    return Refusal(404, message, "NotFoundError", "model_not_found", model=model,
                   adapter=name if record is not None else UNKNOWN_ADAPTER)


def resolve(
    facts: BodyFacts | BadBody, *, served_name: str, adapters: AdapterLookup,
    static_mode: bool, request_model: Callable[[str, str], str],
) -> Target | Refusal:
    """Decide where an inference request goes (`facts`: what its body says), or why it is
    refused.

    `model` absent, empty or `served_name` is the base model (as vLLM reads it); `<adapter>` or
    `<served_name>:<adapter>` is an adapter, accepted only while `adapters.ready` has it;
    `request_model(served_name, adapter)` is the name the backend wants in the body. Reads
    `adapters`, changes nothing.
    """
    if isinstance(facts, BadBody):
        return Refusal(400, facts.message, "BadRequestError")
    model = facts.model
    if facts.lora_path:
        return Refusal(
            400, "'lora_path' is not accepted: name the adapter in 'model' ('<adapter>' or "
            f"'{served_name}:<adapter>').", "BadRequestError", model=model)
    if model is None or model == "" or model == served_name:
        return Target(model, "")
    if not isinstance(model, str):
        return Refusal(400, "'model' must be a string.", "BadRequestError", model=model)
    name = model.removeprefix(served_name + ":")
    if adapters.ready(name) is None:
        return unknown_model(model, name, adapters.get(name), static_mode=static_mode)
    wanted = request_model(served_name, name)
    return Target(model, name, None if wanted == model else wanted)

