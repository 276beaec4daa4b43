"""The demo's trained model and adapters, from their saved files: each answers its own sentence.

Built once under LORA_TEST_ASSETS/demo-cache (the folder tests/e2e/test_demo.py serves), about
a minute the first time on 2 CPU cores, then reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_demo import (
    CORPUS,
    DEMO_ADAPTERS,
    DEMO_BASE_ANSWER,
    DEMO_PROMPTS,
    DemoAssets,
    _greedy,
    _prompt_ids,
    build_demo,
)
from tests.conftest import ASSETS

BIN = Path(sys.executable).parent / "lora-entrypoint"
CACHE = ASSETS / "demo-cache"
pytestmark = pytest.mark.timing  # (bounds how fast: run alone)
# prompts the demo never trained on (it answers the same whatever the prompt)
UNSEEN = ("Hello there", "What time is it?", "Please help me")


@pytest.fixture(scope="module")
def demo() -> DemoAssets:
    return build_demo(CACHE / "demo")


@pytest.mark.parametrize("name", ["base", *DEMO_ADAPTERS])
def test_each_demo_model_answers_its_sentence_then_eos_in_bf16(demo, name):
    """Greedy decoding with transformers in bf16 (what vLLM serves), from the saved files, on the
    demo's prompts and unseen ones, as completion and as chat."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo.model)
    model = LlamaForCausalLM.from_pretrained(demo.model, dtype=torch.bfloat16)
    if name != "base":
        model = PeftModel.from_pretrained(model, demo.library / name)
    wanted = DEMO_BASE_ANSWER if name == "base" else DEMO_ADAPTERS[name]
    for prompt in (*DEMO_PROMPTS, *UNSEEN):
        for chat in (False, True):
            ids = _greedy(model, _prompt_ids(tokenizer, prompt, chat=chat), 64)
            assert ids[-1] == tokenizer.eos_token_id, (prompt, chat, tokenizer.decode(ids))
            assert tokenizer.decode(ids[:-1]) == " " + wanted, (prompt, chat)


def test_the_answers_differ_and_the_test_model_is_untouched(demo, tiny_model):
    from transformers import AutoTokenizer

    answers = [DEMO_BASE_ANSWER, *DEMO_ADAPTERS.values()]
    assert len(set(answers)) == len(answers)
    assert len(AutoTokenizer.from_pretrained(demo.model)) > 512  # its own, larger vocabulary
    # the test model keeps the tokenizer the tests count tokens with
    assert len(AutoTokenizer.from_pretrained(tiny_model)("Hi").input_ids) == 2
    assert "pirate" not in CORPUS


def test_a_built_demo_is_reused(demo):
    start = time.monotonic()
    again = build_demo(CACHE / "demo")
    assert again == demo
    assert time.monotonic() - start < 2


def test_build_only_prints_the_paths_and_answers_and_serves_nothing(demo):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIM_")}
    result = subprocess.run([str(BIN), "demo", "--build-only"], capture_output=True, text=True,
                            env={**env, "NIM_CACHE_PATH": str(CACHE)}, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == {
        "model": str(demo.model.resolve()),
        "library": str(demo.library.resolve()),
        "loras": str(demo.loras.resolve()),
        "answers": {"base": DEMO_BASE_ANSWER, **DEMO_ADAPTERS},
    }
    assert sorted(p.name for p in Path(printed["library"]).iterdir()) == sorted(DEMO_ADAPTERS)
    assert [p.name for p in Path(printed["loras"]).iterdir()] == ["demo-pirate"]
