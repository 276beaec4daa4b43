"""On vLLM's CPU build, base-model answers never carry an adapter's weights.

vLLM marks a request without an adapter with slot index -1, and the CPU LoRA ops index the slot
stack with it, which torch reads as the last slot: once every `--max-loras` slot holds an adapter,
base requests batched with adapter requests came back with the last slot's adapter applied.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.server import make_source, tiny_env

pytestmark = pytest.mark.e2e
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "Write a poem about"]
ADAPTERS = ("iso-a", "iso-b", "iso-c")


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, library, tmp_path_factory):
    source = make_source(tmp_path_factory.mktemp("isolation"), library,
                         dict(zip(ADAPTERS, ("alpha", "beta", "gamma"), strict=True)))
    return serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="60", NIM_MAX_GPU_LORAS="2",
                 NIM_MAX_CPU_LORAS="4", NIM_MAX_LORA_RANK="16"),
        name="isolation",
    ).wait_ready()


def test_base_answers_stay_base_with_every_slot_full(server):
    base = {prompt: server.complete("tiny", prompt) for prompt in PROMPTS}  # no slot used yet
    own = {(name, prompt): server.complete(name, prompt) for name in ADAPTERS
           for prompt in PROMPTS}  # every slot now holds an adapter
    assert all(own[(name, p)] != base[p] for name in ADAPTERS for p in PROMPTS)

    jobs = [("tiny", PROMPTS[i % len(PROMPTS)]) for i in range(30)]
    jobs += [(ADAPTERS[i % 2], PROMPTS[i % len(PROMPTS)]) for i in range(30)]
    jobs = [job for pair in zip(jobs[:30], jobs[30:], strict=True) for job in pair]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: server.complete(*job), jobs))

    wrong_base = [(p, a) for (m, p), a in zip(jobs, answers, strict=True)
                  if m == "tiny" and a != base[p]]
    wrong_adapter = [(m, p) for (m, p), a in zip(jobs, answers, strict=True)
                     if m != "tiny" and a != own[(m, p)]]
    assert not wrong_base, f"{len(wrong_base)} of 30 base answers carried adapter weights"
    assert not wrong_adapter, f"adapter answers changed when batched: {wrong_adapter}"
