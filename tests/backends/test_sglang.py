"""Contract tests: the SGLang backend module against the SGLang test double, started the way the
entrypoint starts the real one (`python -m sglang.launch_server`, tests/fakes on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from entrypoint.backends import Outcome
from entrypoint.backends.sglang import SGLangBackend, target_modules
from tests.conftest import copy_adapter, edit_config
from tests.e2e.server import free_port

FAKES = Path(__file__).resolve().parent.parent / "fakes"


def launch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(FAKES)}
    return subprocess.Popen([sys.executable, "-m", "sglang.launch_server", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def sglang(tiny_model):
    port = free_port()
    process = launch("--model-path", str(tiny_model), "--served-model-name", "tiny",
                     "--port", str(port), "--enable-lora", "--max-lora-rank", "16",
                     "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def call(url: str, method: str, *args, **kwargs):
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return await getattr(SGLangBackend(), method)(client, *args, **kwargs)

    return asyncio.run(go())


def test_load_unload_and_list(sglang, library):
    assert call(sglang, "load", "alpha", library / "alpha").outcome is Outcome.DONE
    assert call(sglang, "loaded") == {"alpha": str(library / "alpha")}
    again = call(sglang, "load", "alpha", library / "alpha")
    assert again.outcome is Outcome.ALREADY_LOADED and "already loaded" in again.message
    assert call(sglang, "unload", "alpha").outcome is Outcome.DONE
    gone = call(sglang, "unload", "alpha")
    assert gone.outcome is Outcome.GONE and "does not exist" in gone.message
    assert call(sglang, "loaded") == {}


def test_a_swap_is_unload_then_load(sglang, library):
    assert call(sglang, "load", "beta", library / "beta").outcome is Outcome.DONE
    assert call(sglang, "load", "beta", library / "gamma").outcome is Outcome.ALREADY_LOADED
    assert call(sglang, "unload", "beta").outcome is Outcome.DONE
    assert call(sglang, "load", "beta", library / "gamma").outcome is Outcome.DONE
    assert call(sglang, "loaded")["beta"] == str(library / "gamma")
    call(sglang, "unload", "beta")


def test_refusals_are_read_as_refused(sglang, library, tmp_path):
    big = call(sglang, "load", "big", library / "big")
    assert big.outcome is Outcome.REFUSED
    assert "incompatible with the current LoRA memory pool configuration" in big.message
    edit_config(copy_adapter(library / "alpha", tmp_path / "dora"), use_dora=True)
    dora = call(sglang, "load", "dora", tmp_path / "dora")
    assert dora.outcome is Outcome.REFUSED and "DoRA" in dora.message
    missing = call(sglang, "load", "nowhere", tmp_path / "nowhere")
    assert missing.outcome is Outcome.REFUSED and "Repo id" in missing.message


def test_unreachable_is_transient(library):
    reply = call(f"http://127.0.0.1:{free_port()}", "load", "alpha", library / "alpha")
    assert reply.outcome is Outcome.TRANSIENT


def test_the_double_keeps_sglangs_traps(sglang, library):
    """What makes the gateway's checks necessary, seen on the double directly."""
    call(sglang, "load", "alpha", library / "alpha")
    completion = {"prompt": "Hello", "max_tokens": 4}
    base = httpx.post(sglang + "/v1/completions", json={**completion, "model": "tiny"}).json()
    bare = httpx.post(sglang + "/v1/completions", json={**completion, "model": "alpha"})
    assert bare.status_code == 200 and bare.json()["choices"] == base["choices"]  # silent base
    full = httpx.post(sglang + "/v1/completions", json={**completion, "model": "tiny:alpha"})
    assert full.json()["choices"] != base["choices"]
    unknown = httpx.post(sglang + "/v1/completions", json={**completion, "model": "tiny:zeta"})
    assert unknown.status_code == 400 and "never been loaded: zeta" in unknown.text
    call(sglang, "unload", "alpha")
    again = httpx.post(sglang + "/v1/completions", json={**completion, "model": "tiny:alpha"})
    assert again.status_code == 200  # the silent reload from the old path
    assert "alpha" in call(sglang, "loaded")
    call(sglang, "unload", "alpha")


@pytest.mark.parametrize(("args", "message"), [
    (["--enable-lora"], "you need to specify both --max-lora-rank and --lora-target-modules"),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all",
      "--served-model-name", "org:tiny"], "cannot contain a colon"),
    (["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "all",
      "--max-loras-per-batch", "8", "--max-loaded-loras", "4"], "max_loaded_loras should be"),
])
def test_the_double_refuses_what_sglang_refuses_at_start(tiny_model, args, message):
    process = launch("--model-path", str(tiny_model), "--port", str(free_port()), *args)
    out, _ = process.communicate(timeout=30)
    assert process.returncode != 0 and message in out


def test_target_modules_union_or_all():
    assert target_modules([("q_proj", "v_proj"), ("k_proj", "q_proj")]) == ["q_proj", "k_proj",
                                                                          "v_proj"]
    assert target_modules([]) == ["all"]
    assert target_modules([("q_proj",), ("all-linear",)]) == ["all"]
