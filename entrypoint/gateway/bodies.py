"""Request bodies: what routing needs from one (its `model`, whether it names a `lora_path`),
and the body with another `model` when the backend wants another name.

Parsing JSON holds the interpreter for as long as it takes (a 30 MB body of nested lists took
8 s), and the public port's event loop must keep answering health checks meanwhile: bodies over
`INLINE_BYTES` are parsed in a separate process (`BodyParser`), small ones at once. Pure
functions and that one worker process; no routing decisions here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: bodies up to this size are parsed on the event loop (a few ms at worst); larger ones in the
#: parsing process
INLINE_BYTES = 128 << 10


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What routing reads from a request body."""

    #: the client's `model` (any JSON value; None when absent)
    model: object
    #: the body names a `lora_path` (SGLang's other way of choosing an adapter)
    lora_path: bool = False


@dataclass(frozen=True, slots=True)
class BadBody:
    """Why a body cannot be routed: a 400 with this message."""

    message: str


def json_object(raw: bytes) -> dict | BadBody:
    """A request body that must be a JSON object, or why it is not one."""
    try:
        body = json.loads(raw)
    except RecursionError:
        return BadBody("Request body is nested too deeply.")
    except ValueError:
        return BadBody("Request body is not valid JSON.")
    if not isinstance(body, dict):
        return BadBody("Request body must be a JSON object.")
    return body


def read_facts(raw: bytes) -> BodyFacts | BadBody:
    """The facts routing needs from an inference request body."""
    body = json_object(raw)
    if isinstance(body, BadBody):
        return body
    return BodyFacts(body.get("model"), "lora_path" in body)


def renamed(raw: bytes, model: str) -> bytes:
    """`raw` (a JSON object already read by `read_facts`) with `model` in place of its own."""
    body = json.loads(raw)
    body["model"] = model
    return json.dumps(body).encode()


class BodyParser:
    """Runs `read_facts` and `renamed` at once for small bodies, in one worker process (started
    at the first large body, spawned, so it shares nothing with this one) for large ones."""

    def __init__(self, *, inline: int = INLINE_BYTES) -> None:
        self.inline = inline
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def facts(self, raw: bytes) -> BodyFacts | BadBody:
        if len(raw) <= self.inline:
            return read_facts(raw)
        try:
            return await self._run(read_facts, raw)
        except concurrent.futures.process.BrokenProcessPool:
            return BadBody("Request body could not be parsed.")

    async def renamed(self, raw: bytes, model: str) -> bytes | BadBody:
        if len(raw) <= self.inline:
            return renamed(raw, model)
        try:
            return await self._run(renamed, raw, model)
        except concurrent.futures.process.BrokenProcessPool:
            return BadBody("Request body could not be parsed.")

    async def _run(self, function: Callable[..., T], *args: object) -> T:
        pool = self._pool
        if pool is None:
            pool = self._pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except concurrent.futures.process.BrokenProcessPool:
            log.warning("the process that parses large request bodies died; starting another")
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
