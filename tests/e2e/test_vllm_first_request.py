"""The very first request of a fresh vLLM CPU server is a two-token prompt, and it is answered.

On CPUs with AMX, vLLM's CPU attention used AMX instructions in a process that never asked Linux
for permission, so a short first prompt killed the worker with SIGILL (a long one hid it, because
oneDNN asked first). The entrypoint's vLLM plugin asks in every vLLM process. This module starts
a fresh server per case, base model or adapter first, static or dynamic mode.
"""

from __future__ import annotations

import re

import pytest

from tests.e2e.server import CPU_PROCESSES, make_source, tiny_env

pytestmark = pytest.mark.e2e
SHORT = "Hi"  # two tokens for the tiny model's tokenizer


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("first", ["base", "adapter"])
def test_first_request_is_a_two_token_prompt(serve_factory, tiny_model, library, tmp_path, mode,
                                             first):
    source = make_source(tmp_path, library, {"first-a": "alpha"})
    extra = {"NIM_PEFT_REFRESH_INTERVAL": "60"} if mode == "dynamic" else {}
    extra |= CPU_PROCESSES  # the worker in its own process, as a CPU user runs it
    server = serve_factory(tiny_env(tiny_model, source, **extra),
                           name=f"first-{mode}-{first}").wait_ready()
    model = "tiny" if first == "base" else "first-a"

    def ask(name: str):
        return server.openai.completions.create(model=name, prompt=SHORT, max_tokens=4,
                                                temperature=0, extra_body={"ignore_eos": True})

    reply = ask(model)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, 4)
    other = ask("first-a" if first == "base" else "tiny")  # the worker is still there
    assert other.usage.completion_tokens == 4
    assert ask(model).choices[0].text == reply.choices[0].text
    logs = server.logs()
    assert "died unexpectedly" not in logs and "Illegal instruction" not in logs
    # the plugin ran in the processes that compute (engine core, worker)
    plugin = re.findall(r"\((\w+)[^)]*pid=(\d+)\).*lora-entrypoint plugin in pid \d+: AMX tile "
                        r"permission (granted|not needed)", logs)
    kinds = {kind.split("_")[0].rstrip("-0123456789") for kind, _, _ in plugin}
    assert {"EngineCore", "VllmWorker"} <= kinds, logs[-3000:]
    server.terminate()
