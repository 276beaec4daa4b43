"""Backends: one module per serving engine behind the interface in `base`."""

from __future__ import annotations

from entrypoint.backends.base import Backend, Outcome, Reply, StartSpec
from entrypoint.backends.sglang import SGLangBackend
from entrypoint.backends.vllm import VLLMBackend

BACKENDS: dict[str, type[Backend]] = {"vllm": VLLMBackend, "sglang": SGLangBackend}


def get_backend(name: str) -> Backend:
    """The backend named by a profile."""
    return BACKENDS[name]()


__all__ = ["Backend", "Outcome", "Reply", "StartSpec", "get_backend", "BACKENDS"]
