"""A backend with vLLM's interface whose HTTP calls are a dict and a script of replies."""

from __future__ import annotations

import asyncio

from entrypoint.backends.base import Outcome, Reply
from entrypoint.backends.vllm import VLLMBackend


class ScriptedBackend(VLLMBackend):
    """vLLM's interface with the HTTP calls replaced by a dict and a script of replies."""

    def __init__(self) -> None:
        self.served: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.refuse: set[str] = set()
        self.down = False
        self.late_unload: float | None = None  # unloads time out here and land this much later

    async def load(self, client, name, path) -> Reply:
        self.calls.append(("load", name))
        if self.down:
            return Reply(Outcome.TRANSIENT, "ConnectError")
        if name in self.refuse:
            return Reply(Outcome.REFUSED, "bad tensors")
        if name in self.served:
            return Reply(Outcome.ALREADY_LOADED, "already loaded")
        self.served[name] = str(path)
        return Reply(Outcome.DONE)

    async def unload(self, client, name) -> Reply:
        self.calls.append(("unload", name))
        if self.late_unload is not None:
            asyncio.get_running_loop().call_later(self.late_unload, self.served.pop, name, None)
            return Reply(Outcome.TRANSIENT, "ReadTimeout", unanswered=True)
        return Reply(Outcome.DONE) if self.served.pop(name, None) else Reply(Outcome.GONE)

    async def loaded(self, client) -> dict[str, str]:
        return dict(self.served)


