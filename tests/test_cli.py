"""The CLI as a user meets it: bad configuration fails fast with one line, no traceback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clirun import Ran, run_cli

BIN = Path(sys.executable).parent / "lora-entrypoint"


def run(env: dict[str, str], *args: str) -> tuple[Ran, float]:
    start = time.monotonic()
    result = run_cli("serve", *args, env=env)
    return result, time.monotonic() - start


@pytest.fixture
def base_env(tiny_model, tmp_path) -> dict[str, str]:
    (tmp_path / "loras").mkdir()
    return {"NIM_MODEL_NAME": str(tiny_model), "NIM_PEFT_SOURCE": str(tmp_path / "loras")}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NIM_PEFT_SOURCE": "/no/such/loras"}, "error: NIM_PEFT_SOURCE=/no/such/loras: no such "
         "folder; create it or mount your adapter folder there"),
        ({"NIM_PEFT_REFRESH_INTERVAL": "ten"}, "error: NIM_PEFT_REFRESH_INTERVAL=ten: must be a "
         "number"),
        ({"NIM_PEFT_REFRESH_INTERVAL": "-1"}, "error: NIM_PEFT_REFRESH_INTERVAL=-1: must be a "
         "number of seconds above 0"),
        ({"NIM_MAX_LORA_RANK": "48"}, "error: NIM_MAX_LORA_RANK=48: vLLM allows only 1, 8, 16, "
         "32, 64, 128, 256, 320, 512"),
        ({"NIM_MODEL_PROFILE": "trtllm-fp8"}, "error: NIM_MODEL_PROFILE=trtllm-fp8: no such "
         "profile; known profiles: sglang-bf16-tp1-pp1, sglang-bf16-tp1-pp1-feat_lora, "),
        ({"NIM_MODEL_PROFILE": "vllm-bf16-tp2-pp1-feat_lora"}, "error: NIM_MODEL_PROFILE="
         "vllm-bf16-tp2-pp1-feat_lora: not compatible with this machine: needs 2 GPU(s); none "
         "found"),
        ({"NIM_SERVER_PORT": "port"}, "error: NIM_SERVER_PORT=port: must be a whole number"),
        ({"NIM_SERVER_PORT": "0"}, "error: NIM_SERVER_PORT=0: must be a TCP port"),
    ],
)
def test_bad_configuration_fails_fast_with_one_line(base_env, env, message):
    result, took = run({**base_env, **env})
    assert result.returncode == 2, result.stderr
    # before any backend could start (a start takes a minute here); a 10 s bound failed once
    # with the unit tests in two processes beside a running vLLM
    assert took < 30, took
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_the_console_script_fails_fast_with_one_line(base_env):
    """The installed `lora-entrypoint` itself (the other tests run its commands in-process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NIM_")}
    result = subprocess.run([str(BIN), "serve"], capture_output=True, text=True, timeout=60,
                            env={**clean, **base_env, "NIM_SERVER_PORT": "0"})
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: NIM_SERVER_PORT=0: must be a TCP port between 1 and 65535\n"
    assert result.stdout == ""


def test_busy_port_is_reported_before_the_backend_starts(base_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result, took = run({**base_env, "NIM_SERVER_PORT": str(port)}, "--host", "127.0.0.1")
    assert result.returncode == 2 and took < 15
    assert f"error: NIM_SERVER_PORT={port}: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "starting vllm" not in result.stderr
    assert "Traceback" not in result.stderr


def test_dry_run_prints_the_plan(base_env, library, tmp_path):
    loras = Path(base_env["NIM_PEFT_SOURCE"])
    (loras / "alpha").symlink_to(library / "alpha")
    result, _ = run({**base_env, "NIM_PEFT_REFRESH_INTERVAL": "3"}, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["profile"]["name"] == "vllm-cpu-bf16-tp1-pp1-feat_lora"
    assert plan["backend"] == "vllm"
    assert plan["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert [a["name"] for a in plan["adapters"]] == ["alpha"]


def check(*args: str) -> Ran:
    return run_cli("check-adapters", *args)


def test_check_adapters_reports_each_folder(library, tmp_path):
    from tests.conftest import copy_adapter, edit_config

    loras = tmp_path / "loras"
    loras.mkdir()
    copy_adapter(library / "alpha", loras / "alpha")
    edit_config(copy_adapter(library / "beta", loras / "dora"), use_dora=True)
    good = check(str(loras / "..") + "/loras")
    assert good.returncode == 1  # dora is invalid
    lines = dict(line.split("\t", 1) for line in good.stdout.splitlines())
    assert lines["alpha"] == "ok\trank 8"
    assert lines["dora"].startswith("invalid\tDoRA adapters")
    listed = json.loads(check(str(loras), "--json").stdout)
    assert [(a["name"], a["valid"], a["rank"]) for a in listed] == [("alpha", True, 8),
                                                                   ("dora", False, 8)]
    assert listed[1]["reason"].startswith("DoRA") and listed[0]["reason"] is None
    (loras / "dora").rename(loras / ".dora")  # hidden: ignored
    assert check(str(loras)).returncode == 0


def test_check_adapters_uses_nim_peft_source(library, tmp_path):
    result = run_cli("check-adapters",
                     env={"NIM_PEFT_SOURCE": str(library), "NIM_MAX_LORA_RANK": "16"})
    assert result.returncode == 1
    assert "big\tinvalid\trank 64 is above NIM_MAX_LORA_RANK=16" in result.stdout


def test_check_adapters_reads_a_list_file(library, tmp_path):
    listed = tmp_path / "adapters.yaml"
    listed.write_text(f"adapters:\n  - name: sql\n    uri: {library / 'alpha'}\n"
                      f"  - name: large\n    uri: file://{library / 'big'}\n"
                      "  - name: odd\n    uri: relative/x\n")
    result = run_cli("check-adapters", str(listed), env={"NIM_MAX_LORA_RANK": "16"})
    assert result.returncode == 1, result.stderr
    assert "sql\tok\trank 8" in result.stdout
    assert "large\tinvalid\trank 64 is above NIM_MAX_LORA_RANK=16" in result.stdout
    assert "odd" not in result.stdout and "entry 3" in result.stderr


@pytest.mark.parametrize("max_rank", [None, "16"])
def test_check_adapters_and_dry_run_judge_every_folder_alike(base_env, library, max_rank):
    """Both use the limit `serve` would: derived from the folders (64 here), or the user's."""
    from tests.conftest import copy_adapter

    loras = Path(base_env["NIM_PEFT_SOURCE"])
    copy_adapter(library / "alpha", loras / "alpha")
    copy_adapter(library / "big", loras / "big")  # rank 64
    env = {**base_env, **({"NIM_MAX_LORA_RANK": max_rank} if max_rank else {})}
    result, _ = run(env, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    served = {a["name"]: (a["valid"], a["reason"]) for a in plan["adapters"]}
    checked = run_cli("check-adapters", "--json", env=env)
    judged = {a["name"]: (a["valid"], a["reason"]) for a in json.loads(checked.stdout)}
    assert judged == served
    if max_rank is None:
        assert plan["max_lora_rank"] == 64 and judged["big"] == (True, None)
        assert checked.returncode == 0
        assert "rank limit 64 (derived from the adapters found at start" in run_cli(
            "check-adapters", env=env).stderr
    else:
        assert plan["max_lora_rank"] == 16 and checked.returncode == 1
        assert judged["big"] == (False, "rank 64 is above NIM_MAX_LORA_RANK=16; raise "
                                        "NIM_MAX_LORA_RANK or use a smaller adapter")


def run_tool(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NIM_")}
    return subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_list_model_profiles_on_two_h100(fake_gpus, tmp_path):
    env = {**fake_gpus("2xH100"), "NIM_PEFT_SOURCE": str(tmp_path)}
    result = run_tool([str(BIN.parent / "list-model-profiles")], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("SYSTEM INFO\n- GPUs:\n  - (0) NVIDIA H100 80GB HBM3 [80 GiB, compute "
                          "capability 9.0]\n  - (1) NVIDIA H100")
    sections = ["MODEL PROFILES", "- Compatible with system and runnable:",
                "  - With LoRA support:", "- Compatible with system but low on memory:",
                "- Incompatible with system:"]
    positions = [out.index(s) for s in sections]
    assert positions == sorted(positions)
    selected = [line for line in out.splitlines() if "<- selected" in line]
    assert len(selected) == 1 and "(vllm-fp8-tp2-pp1-feat_lora)" in selected[0]
    assert "(vllm-bf16-tp8-pp1): needs 8 GPUs (tp 8 x pp 1); 2 found" in out


def test_list_model_profiles_json(fake_gpus):
    result = run_cli("list-model-profiles", "--json", env=fake_gpus("8xA100"))
    listed = json.loads(result.stdout)
    keys = {"id", "name", "backend", "precision", "tp", "pp", "lora", "compatible", "reason",
            "selected"}
    assert all(keys <= set(item) for item in listed)
    assert [i["name"] for i in listed if i["selected"]] == ["vllm-bf16-tp8-pp1"]
    fp8 = next(i for i in listed if i["name"] == "sglang-fp8-tp1-pp1")
    assert not fp8["compatible"] and "compute capability 8.9+" in fp8["reason"]


def test_dry_run_shows_an_eight_gpu_command_from_a_laptop(base_env):
    result, _ = run({**base_env, "NIM_MODEL_PROFILE": "sglang-bf16-tp8-pp1-feat_lora",
                     "NIM_PEFT_REFRESH_INTERVAL": "5"}, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["backend"] == "sglang"
    assert plan["argv"][1:3] == ["-m", "sglang.launch_server"]
    assert plan["argv"][plan["argv"].index("--tp-size") + 1] == "8"
    assert "not compatible with this machine: needs 8 GPU(s); none found" in result.stderr


def test_check_adapters_reads_an_hf_uri(library, hub_server, monkeypatch):
    """One Hub repository, fetched from the Hub-compatible server of the tests and judged as a
    folder; a missing one is reported with its reason."""
    from tests.hubserver import hub_environment

    hub_server.commit("acme/check", library / "alpha")
    hub_environment(monkeypatch, hub_server)
    env = {"NIM_MAX_LORA_RANK": "16"}
    result = run_cli("check-adapters", "hf://acme/check", env=env)
    assert result.returncode == 0, result.stderr
    assert "check\tok\trank 8" in result.stdout
    missing = run_cli("check-adapters", "hf://acme/missing", env=env)
    assert missing.returncode == 1 and "hf://acme/missing was not found" in missing.stdout
    bad = run_cli("check-adapters", "hf://acme", env=env)
    assert bad.returncode != 0 and "does not name a repository" in bad.stderr

