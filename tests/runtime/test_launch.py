import json
from pathlib import Path

import pytest

from entrypoint.config.profiles import find_profile, load_profiles
from entrypoint.config.settings import ConfigError, load_settings
from entrypoint.runtime.launch import build_launch_plan, plan_backend
from entrypoint.runtime.startup import judge_adapters
from tests.conftest import copy_adapter, edit_config

CPU_LORA = "vllm-cpu-bf16-tp1-pp1-feat_lora"


@pytest.fixture
def source(tmp_path, library) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    copy_adapter(library / "alpha", folder / "alpha")
    copy_adapter(library / "beta", folder / "beta")
    bad = copy_adapter(library / "gamma", folder / "gamma")
    edit_config(bad, use_dora=True)
    return folder


def plan_for(monkeypatch, tiny_model, source, profile=CPU_LORA, **env):
    monkeypatch.setenv("NIM_MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("NIM_SERVED_MODEL_NAME", "tiny")
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(source))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    chosen = find_profile(load_profiles(), profile)
    backend = plan_backend(settings, chosen)
    adapters, limit = judge_adapters(settings, backend)
    return build_launch_plan(settings, chosen, list(adapters), backend=backend, limit=limit,
                             port=9999, python="python")


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_static_plan_passes_only_valid_adapters(monkeypatch, tiny_model, source):
    plan = plan_for(monkeypatch, tiny_model, source, NIM_MAX_MODEL_LEN="512")
    argv = plan.argv
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(argv, "--model") == str(tiny_model)
    assert flag(argv, "--served-model-name") == "tiny"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "9999")
    assert "--enable-lora" in argv
    assert (flag(argv, "--max-loras"), flag(argv, "--max-cpu-loras")) == ("8", "16")
    assert flag(argv, "--max-lora-rank") == "16"
    assert flag(argv, "--max-model-len") == "512"
    modules = argv[argv.index("--lora-modules") + 1:]
    entries = [json.loads(m) for m in modules]
    assert [e["name"] for e in entries] == ["alpha", "beta"]  # gamma (DoRA) is never passed
    assert all(e["base_model_name"] == "tiny" for e in entries)
    assert entries[0]["path"] == str(source / "alpha")
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plan.env
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_dynamic_plan_enables_runtime_updates(monkeypatch, tiny_model, source):
    plan = plan_for(monkeypatch, tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="5",
                    NIM_MAX_GPU_LORAS="2", NIM_MAX_CPU_LORAS="4", NIM_MAX_LORA_RANK="64")
    assert "--lora-modules" not in plan.argv
    assert plan.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert (flag(plan.argv, "--max-loras"), flag(plan.argv, "--max-cpu-loras")) == ("2", "4")
    assert flag(plan.argv, "--max-lora-rank") == "64"


def test_derived_rank_covers_the_adapters_present(monkeypatch, tiny_model, source, library):
    copy_adapter(library / "big", source / "big")
    plan = plan_for(monkeypatch, tiny_model, source)
    assert plan.rank_limit.value == 64 and plan.rank_limit.derived
    assert flag(plan.argv, "--max-lora-rank") == "64"


def test_passthrough_comes_last(monkeypatch, tiny_model, source):
    plan = plan_for(monkeypatch, tiny_model, source, NIM_PASSTHROUGH_ARGS="--max-loras 3 --seed 1")
    assert plan.argv[-4:] == ["--max-loras", "3", "--seed", "1"]


def test_rank_vllm_does_not_allow(monkeypatch, tiny_model, source):
    with pytest.raises(ConfigError, match=r"^NIM_MAX_LORA_RANK=24: vLLM allows only 1, 8, 16"):
        plan_for(monkeypatch, tiny_model, source, NIM_MAX_LORA_RANK="24")


def test_unknown_profile_lists_known_names():
    with pytest.raises(ConfigError) as info:
        find_profile(load_profiles(), "vllm-fp64-tp3")
    assert str(info.value).startswith("NIM_MODEL_PROFILE=vllm-fp64-tp3: no such profile")
    assert CPU_LORA in str(info.value)


def test_profile_by_id(monkeypatch):
    profile = find_profile(load_profiles(), CPU_LORA)
    assert len(profile.id) == 64
    assert find_profile(load_profiles(), profile.id).name == CPU_LORA


def sglang_plan(monkeypatch, tiny_model, source, profile="sglang-bf16-tp1-pp1-feat_lora", **env):
    return plan_for(monkeypatch, tiny_model, source, profile, **env)


def test_sglang_static_argv_exactly(monkeypatch, tiny_model, source):
    plan = sglang_plan(monkeypatch, tiny_model, source, NIM_MAX_MODEL_LEN="512")
    assert plan.argv == [
        "python", "-m", "sglang.launch_server", "--model-path", str(tiny_model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "9999",
        "--dtype", "bfloat16", "--tp-size", "1", "--context-length", "512",
        "--enable-lora", "--max-loras-per-batch", "9", "--max-loaded-loras", "16",
        "--max-lora-rank", "16", "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj",
        "--lora-paths", f"alpha={source / 'alpha'}", f"beta={source / 'beta'}",
    ]
    assert plan.env == {}


def test_sglang_dynamic_argv_exactly(monkeypatch, tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = sglang_plan(monkeypatch, tiny_model, empty, profile="sglang-fp8-tp4-pp1-feat_lora",
                       NIM_PEFT_REFRESH_INTERVAL="5", NIM_MAX_GPU_LORAS="4",
                       NIM_MAX_CPU_LORAS="32")
    assert plan.argv == [
        "python", "-m", "sglang.launch_server", "--model-path", str(tiny_model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "9999",
        "--dtype", "bfloat16", "--quantization", "fp8", "--tp-size", "4",
        "--enable-lora", "--max-loras-per-batch", "5", "--max-loaded-loras", "32",
        "--max-lora-rank", "16", "--lora-target-modules", "all",
    ]


def test_sglang_refuses_a_served_name_with_a_colon(monkeypatch, tiny_model, source):
    with pytest.raises(ConfigError, match=r"^NIM_SERVED_MODEL_NAME=org:tiny: contains ':'"):
        sglang_plan(monkeypatch, tiny_model, source, NIM_SERVED_MODEL_NAME="org:tiny")


def test_vllm_gpu_dynamic_argv_exactly(monkeypatch, tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    plan = sglang_plan(monkeypatch, tiny_model, empty, profile="vllm-fp8-tp2-pp1-feat_lora",
                       NIM_PEFT_REFRESH_INTERVAL="5", NIM_PASSTHROUGH_ARGS="--max-lora-rank 64")
    assert plan.argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
        "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", "9999",
        "--disable-uvicorn-access-log", "--shutdown-timeout", "15", "--dtype", "bfloat16",
        "--quantization", "fp8",
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "1",
        "--enable-lora", "--max-loras", "8", "--max-cpu-loras", "16", "--max-lora-rank", "16",
        "--max-lora-rank", "64",  # passthrough comes last, so it wins
    ]
    assert plan.env == {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}


def test_tp_from_the_environment_overrides_the_profile(monkeypatch, tiny_model, source):
    plan = sglang_plan(monkeypatch, tiny_model, source, profile="vllm-bf16-tp2-pp1-feat_lora",
                       NIM_TENSOR_PARALLEL_SIZE="4")
    assert flag(plan.argv, "--tensor-parallel-size") == "4"


@pytest.mark.parametrize(("plugins", "expected"), [
    (None, None),  # vLLM loads every installed plugin, ours included
    ("lora_filesystem_resolver", "lora_filesystem_resolver,lora_entrypoint"),
    ("lora_entrypoint,x", "lora_entrypoint,x"),
    ("", "lora_entrypoint"),
])
def test_our_vllm_plugin_stays_enabled(monkeypatch, tiny_model, source, plugins, expected):
    env = {} if plugins is None else {"VLLM_PLUGINS": plugins}
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plan = plan_for(monkeypatch, tiny_model, source, **env)
    assert plan.env.get("VLLM_PLUGINS") == expected


@pytest.mark.parametrize(("env", "keys"), [
    ({}, ()),
    ({"VLLM_API_KEY": "k1"}, ("k1",)),
    ({"VLLM_API_KEY": "k1", "NIM_PASSTHROUGH_ARGS": "--api-key k2 k3 --seed 1"}, ("k2", "k3")),
    ({"NIM_PASSTHROUGH_ARGS": "--api-key=k4"}, ("k4",)),
])
def test_api_keys_are_found_and_never_shown(monkeypatch, tiny_model, source, env, keys):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    plan = plan_for(monkeypatch, tiny_model, source, **env)
    assert plan.api_keys == keys
    shown = " ".join(plan.shown_argv) + json.dumps(plan.describe())
    assert not any(key in shown for key in keys)
    if "NIM_PASSTHROUGH_ARGS" in env:
        assert any(a.startswith("--api-key") for a in plan.argv) and "***" in shown


def test_sglang_api_key_comes_from_its_flag(monkeypatch, tiny_model, source, fake_gpus):
    fake_gpus("1xH100")
    monkeypatch.setenv("VLLM_API_KEY", "not-for-sglang")
    plan = plan_for(monkeypatch, tiny_model, source, profile="sglang-bf16-tp1-pp1-feat_lora",
                    NIM_PASSTHROUGH_ARGS="--api-key s1")
    assert plan.api_keys == ("s1",)


SGLANG_LORA = "sglang-bf16-tp1-pp1-feat_lora"


def closed_plan(monkeypatch, tiny_model, source, profile, **env):
    monkeypatch.setenv("NIM_MODEL_NAME", str(tiny_model))
    monkeypatch.setenv("NIM_SERVED_MODEL_NAME", "tiny")
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(source))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    chosen = find_profile(load_profiles(), profile)
    backend = plan_backend(settings, chosen)
    adapters, limit = judge_adapters(settings, backend)
    return build_launch_plan(settings, chosen, list(adapters), backend=backend, limit=limit,
                             port=9999, python="python", uds="/run/x/vllm.sock",
                             internal_key="k-internal")


def test_vllm_listens_only_on_a_unix_socket(monkeypatch, tiny_model, source):
    plan = closed_plan(monkeypatch, tiny_model, source, CPU_LORA)
    assert flag(plan.argv, "--uds") == "/run/x/vllm.sock"
    assert "--port" not in plan.argv and "--host" not in plan.argv
    assert (plan.uds, plan.backend_url, plan.backend_key) == (
        "/run/x/vllm.sock", "http://backend", None)
    keyed = closed_plan(monkeypatch, tiny_model, source, CPU_LORA, VLLM_API_KEY="user-key")
    assert keyed.backend_key == "user-key" and keyed.api_keys == ("user-key",)


def test_sglang_on_its_port_requires_a_key_the_entrypoint_made(monkeypatch, tiny_model,
                                                              source, fake_gpus):
    fake_gpus("1xH100")
    plan = closed_plan(monkeypatch, tiny_model, source, SGLANG_LORA)
    assert plan.uds is None and plan.backend_url == "http://127.0.0.1:9999"
    assert flag(plan.argv, "--api-key") == "k-internal" == plan.backend_key
    assert plan.api_keys == ()  # the public port stays open: the key is the entrypoint's own
    assert "k-internal" not in " ".join(plan.shown_argv)
    user = closed_plan(monkeypatch, tiny_model, source, SGLANG_LORA,
                       NIM_PASSTHROUGH_ARGS="--api-key theirs")
    assert user.argv.count("--api-key") == 1 and flag(user.argv, "--api-key") == "theirs"
    assert user.backend_key == "theirs" and user.api_keys == ("theirs",)


def test_the_key_made_for_the_backend_is_never_read_as_an_option():
    from entrypoint.runtime.startup import internal_key

    keys = {internal_key() for _ in range(1000)}
    assert len(keys) == 1000 and not any(key.startswith("-") for key in keys)
