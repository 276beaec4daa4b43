"""The walking skeleton's scenarios on SGLang (its test double), through the CLI, with an SGLang
profile on a machine whose GPU inventory is simulated (a fake nvidia-smi reporting one H100)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import copy_adapter, edit_config, install_fake_smi
from tests.e2e.server import alive, descendants, tiny_env

pytestmark = pytest.mark.e2e
FAKES = Path(__file__).resolve().parents[1] / "fakes"
PROFILE = "sglang-bf16-tp1-pp1-feat_lora"


def sglang_env(tmp: Path, model: Path, source: Path, **extra: str) -> dict[str, str]:
    import os

    smi = install_fake_smi(tmp / "bin", ["NVIDIA H100 80GB HBM3, 81559, 9.0"])
    return {
        "PATH": f"{smi}:{os.environ['PATH']}",
        "PYTHONPATH": str(FAKES),  # `python -m sglang.launch_server` is the double
        "SGLANG_FAKE_LOG": str(tmp / "sglang-requests.jsonl"),
        **tiny_env(model, source, NIM_MODEL_PROFILE=PROFILE, **extra),
    }


def seen_by_sglang(tmp: Path, path: str = "/v1/completions") -> list[dict]:
    log = tmp / "sglang-requests.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [entry["body"] for entry in map(json.loads, lines) if entry["path"] == path]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def source(tmp, library):
    folder = tmp / "loras"
    folder.mkdir()
    copy_adapter(library / "alpha", folder / "alpha")
    edit_config(copy_adapter(library / "gamma", folder / "dora"), use_dora=True)
    return folder


@pytest.fixture(scope="module")
def server(serve_factory, tmp, tiny_model, source):
    env = sglang_env(tmp, tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="30")
    return serve_factory(env, name="sglang").wait_ready(timeout=60)


def test_started_with_the_sglang_command_and_flags(server):
    logs = server.logs()
    assert "-m sglang.launch_server --model-path" in logs
    assert "--max-lora-rank 16 --lora-target-modules q_proj k_proj v_proj o_proj" in logs
    meta = server.http.get("/v1/metadata").json()
    assert meta["profile"]["name"] == PROFILE and meta["backend"]["name"] == "sglang"


def test_adapters_present_at_start_are_served_in_both_name_forms(server, tmp):
    assert server.models() == ["tiny", "alpha"]
    alpha = server.complete("alpha")
    assert alpha != server.complete("tiny")
    assert server.complete("tiny:alpha") == alpha
    # Whatever form the client used, SGLang was sent `tiny:alpha`, never the bare name.
    models = {body["model"] for body in seen_by_sglang(tmp)}
    assert models == {"tiny", "tiny:alpha"}


def test_unknown_and_invalid_names_never_reach_sglang(server, tmp):
    before = len(seen_by_sglang(tmp))
    for model in ("zeta", "tiny:zeta", "dora"):
        with pytest.raises(openai.NotFoundError):
            server.complete(model)
    with pytest.raises(openai.NotFoundError, match="DoRA"):
        server.complete("tiny:dora")
    assert len(seen_by_sglang(tmp)) == before


def test_lora_path_is_not_a_way_around(server, tmp):
    before = len(seen_by_sglang(tmp))
    with pytest.raises(openai.BadRequestError, match="lora_path"):
        server.openai.completions.create(model="tiny", prompt="Hi", max_tokens=2,
                                         extra_body={"lora_path": "alpha"})
    assert len(seen_by_sglang(tmp)) == before


def test_copy_in_remove_and_copy_back(server, tmp, source, library):
    copy_adapter(library / "beta", source / "beta")
    took = server.wait_for(lambda: "beta" in server.models(), what="beta served")
    assert took < 2  # events, not the 30 s interval
    beta = server.complete("beta")
    assert beta not in (server.complete("tiny"), server.complete("alpha"))
    assert {"lora_name": "beta"}.items() <= seen_by_sglang(tmp, "/load_lora_adapter")[-1].items()

    shutil.rmtree(source / "beta")
    server.wait_for(lambda: "beta" not in server.models(), what="beta removed")
    # Refused by us from the moment its folder went; SGLang's unload follows.
    server.wait_for(lambda: seen_by_sglang(tmp, "/unload_lora_adapter"), what="beta unloaded")
    assert seen_by_sglang(tmp, "/unload_lora_adapter")[-1] == {"lora_name": "beta"}
    sent = len(seen_by_sglang(tmp))
    for model in ("beta", "tiny:beta"):
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            server.complete(model)
    # Refused by us: SGLang never got the request, so it could not silently reload beta.
    assert len(seen_by_sglang(tmp)) == sent
    assert "beta" not in server.models()

    copy_adapter(library / "beta", source / "beta")
    server.wait_for(lambda: "beta" in server.models(), what="beta back")
    assert server.complete("beta") == beta


def test_changed_weights_are_unloaded_then_loaded(server, tmp, source, library):
    gamma_weights = (library / "gamma" / "adapter_model.safetensors").read_bytes()
    before = server.complete("alpha")
    (source / "alpha" / "adapter_model.safetensors").write_bytes(gamma_weights)
    server.wait_for(lambda: server.complete("alpha") != before, what="new weights")
    calls = [(e["path"], e["body"].get("lora_name")) for e in map(
        json.loads, (tmp / "sglang-requests.jsonl").read_text().splitlines())
        if e["path"] in ("/load_lora_adapter", "/unload_lora_adapter")]
    assert calls[-2:] == [("/unload_lora_adapter", "alpha"), ("/load_lora_adapter", "alpha")]


def test_sigterm_stops_everything(server):
    children = descendants(server.process.pid)
    assert children
    start = time.monotonic()
    assert server.terminate(timeout=30) == 0
    assert time.monotonic() - start < 30
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)]


def test_static_mode(serve_factory, tmp_path_factory, tiny_model, library):
    tmp = tmp_path_factory.mktemp("sglang-static")
    source = tmp / "loras"
    source.mkdir()
    copy_adapter(library / "alpha", source / "alpha")
    copy_adapter(library / "big", source / "big")  # rank 64: derived --max-lora-rank covers it
    server = serve_factory(sglang_env(tmp, tiny_model, source), name="sglang-static")
    server.wait_ready(timeout=60)
    assert server.models() == ["tiny", "alpha", "big"]
    logs = server.logs()
    assert "--max-lora-rank 64" in logs and "--lora-paths alpha=" in logs
    assert server.complete("big") != server.complete("alpha")
    copy_adapter(library / "beta", source / "beta")
    time.sleep(1.5)
    assert "beta" not in server.models()
    assert server.terminate(timeout=30) == 0


def test_a_served_name_with_a_colon_is_refused_at_start(tmp_path, tiny_model, library):
    import os
    import subprocess
    import sys

    source = tmp_path / "loras"
    source.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NIM_")},
           **sglang_env(tmp_path, tiny_model, source, NIM_SERVED_MODEL_NAME="org:tiny")}
    result = subprocess.run([str(Path(sys.executable).parent / "lora-entrypoint"), "serve"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: NIM_SERVED_MODEL_NAME=org:tiny: contains ':'")
