"""vLLM's own runtime-LoRA test cases (`tests/entrypoints/openai/test_lora_adapters.py` in vLLM),
run through the public port with the official `openai` client, on the real vLLM CPU build.

The server is set up as vLLM's test sets up its own: one adapter present at start (there a
`--lora-modules` entry, here a folder in NIM_PEFT_SOURCE), `--max-lora-rank 64`,
`--max-cpu-loras 2`, runtime loading on. Each case asserts what vLLM's asserts; where this
project is stricter on purpose (a path outside the allowed folders is a 403, not a 404; bad
adapters are 400s where vLLM 0.32 answers 500) the case says so, and docs/operations.md lists it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from contextlib import suppress
from pathlib import Path

import openai
import pytest

from tests.conftest import copy_adapter
from tests.e2e.server import make_source, tiny_env

pytestmark = pytest.mark.e2e

SERVED = "tiny"
BADREQUEST_CASES = [  # vLLM's cases: the config change, and what our 400 says
    ("test_rank", {"r": 1024}, "rank 1024 is above NIM_MAX_LORA_RANK=64"),
    ("test_bias", {"bias": "all"}, "bias='all' is not supported"),
    ("test_dora", {"use_dora": True}, "DoRA adapters (use_dora) are not supported"),
    ("test_modules_to_save", {"modules_to_save": ["lm_head"]},
     "modules_to_save=['lm_head'] is not supported"),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora-suite")


@pytest.fixture(scope="module")
def lora_files(work, library) -> Path:
    """The adapter every case loads (vLLM's test downloads one; ours is built locally)."""
    return copy_adapter(library / "alpha", work / "allowed" / "zephyr-lora-files")


@pytest.fixture(scope="module")
def server(serve_factory, work, tiny_model, library, lora_files):
    source = make_source(work, library, {"zephyr-lora": "alpha"})
    env = tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="30", NIM_MAX_LORA_RANK="64",
                   NIM_MAX_CPU_LORAS="2", NIM_MAX_GPU_LORAS="2",
                   NIM_PEFT_API_ALLOWED_PATHS=str(work / "allowed"))
    return serve_factory(env, name="lora-suite").wait_ready()


@pytest.fixture
def client(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def run(coroutine):
    return asyncio.run(coroutine)


async def load(client: openai.AsyncOpenAI, name: str, path: Path | str) -> str:
    return await client.post("load_lora_adapter", cast_to=str,
                             body={"lora_name": name, "lora_path": str(path)})


def test_static_lora_lineage(server, client, tiny_model, work):
    async def case():
        models = (await client.models.list()).data
        served_model, lora_models = models[0], models[1:]
        assert served_model.id == SERVED
        assert served_model.root == str(tiny_model)
        assert served_model.parent is None
        assert all(lora.root == str(work / "loras" / lora.id) for lora in lora_models)
        assert all(lora.parent == SERVED for lora in lora_models)
        assert lora_models[0].id == "zephyr-lora"

    run(case())


def test_dynamic_lora_lineage(server, client, lora_files):
    async def case():
        response = await load(client, "zephyr-lora-3", lora_files)
        assert "success" in response  # ("Success: ... added successfully.")
        models = (await client.models.list()).data
        dynamic = next(m for m in models if m.id == "zephyr-lora-3")
        assert dynamic.root == str(lora_files)
        assert dynamic.parent == SERVED

    run(case())


def test_dynamic_lora_not_found(server, client, work):
    async def case():
        with pytest.raises(openai.NotFoundError):  # as vLLM: no adapter there
            await load(client, "notfound", work / "allowed" / "not" / "an" / "adapter")
        # vLLM's own path is outside the allowed folders: stricter on purpose, a 403
        with pytest.raises(openai.PermissionDeniedError, match="NIM_PEFT_API_ALLOWED_PATHS"):
            await load(client, "notfound", "/not/an/adapter")

    run(case())


def test_dynamic_lora_invalid_files(server, client, work):
    invalid = work / "allowed" / "invalid_files"
    invalid.mkdir()
    (invalid / "adapter_config.json").write_text("this is not json")  # written just now

    async def case():
        with pytest.raises(openai.BadRequestError, match="not valid JSON"):
            await load(client, "invalid-json", invalid)

    run(case())


@pytest.mark.parametrize(("test_name", "config_change", "expected_error"), BADREQUEST_CASES)
def test_dynamic_lora_badrequests(server, client, work, lora_files, test_name, config_change,
                                  expected_error):
    test_dir = work / "allowed" / test_name
    shutil.copytree(lora_files, test_dir)
    config_path = test_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config.update(config_change)
    config_path.write_text(json.dumps(adapter_config))

    async def case():
        with pytest.raises(openai.BadRequestError, match=re.escape(expected_error)):
            await load(client, test_name, test_dir)

    run(case())


def test_multiple_lora_adapters(server, client, lora_files):
    """Many adapters registered and used at once, with a host cache of 2 (the LRU flexes)."""

    async def load_and_run_adapter(adapter_name: str):
        await load(client, adapter_name, lora_files)
        for _ in range(3):
            await client.completions.create(model=adapter_name,
                                            prompt=["Hello there", "Foo bar bazz buzz"],
                                            max_tokens=5)

    async def case():
        results = await asyncio.gather(*(load_and_run_adapter(f"adapter_{i}")
                                         for i in range(10)), return_exceptions=True)
        for result in results:
            assert not isinstance(result, Exception), f"Got exception {result}"

    run(case())


def test_loading_invalid_adapters_does_not_break_others(server, client, work, lora_files):
    invalid = work / "allowed" / "invalid_files_2"
    invalid.mkdir()
    (invalid / "adapter_config.json").write_text("this is not json")

    async def case():
        stop = asyncio.Event()

        async def run_good_requests() -> list:
            results = []
            while not stop.is_set():
                try:
                    results.append(await client.completions.create(
                        model="zephyr-lora", prompt=["Hello there", "Foo bar bazz buzz"],
                        max_tokens=5))
                except Exception as exc:  # noqa: BLE001 - asserted on below
                    results.append(exc)
            return results

        good = asyncio.create_task(run_good_requests())
        for _ in range(25):
            with suppress(openai.NotFoundError):
                await load(client, "notfound", work / "allowed" / "not-an-adapter")
        for _ in range(25):
            with suppress(openai.BadRequestError):
                await load(client, "invalid", invalid)
        stop.set()
        for result in await good:
            assert not isinstance(result, Exception), f"Got exception {result}"
        await load(client, "valid", lora_files)
        await client.completions.create(model="valid", prompt=["Hello there",
                                                               "Foo bar bazz buzz"], max_tokens=5)

    run(case())


def test_beam_search_with_lora_adapters(server, client, lora_files):
    async def load_and_run_adapter(adapter_name: str):
        await load(client, adapter_name, lora_files)
        for _ in range(3):
            await client.completions.create(model=adapter_name,
                                            prompt=["Hello there", "Foo bar bazz buzz"],
                                            max_tokens=5, extra_body={"use_beam_search": True})

    async def case():
        results = await asyncio.gather(*(load_and_run_adapter(f"beam_{i}") for i in range(3)),
                                       return_exceptions=True)
        for result in results:
            assert not isinstance(result, Exception), f"Got exception {result}"

    run(case())
