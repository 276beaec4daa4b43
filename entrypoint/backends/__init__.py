"""Backends: one module per serving engine behind the interface in `base`."""

from __future__ import annotations

from .base import Backend, Outcome, Reply, StartSpec
from .sglang import SGLangBackend
from .vllm import VLLMBackend

BACKENDS: dict[str, type[Backend]] = {"vllm": VLLMBackend, "sglang": SGLangBackend}


def get_backend(name: str) -> Backend:
    """The backend named by a profile."""
    return BACKENDS[name]()


__all__ = ["Backend", "Outcome", "Reply", "StartSpec", "get_backend", "BACKENDS"]
