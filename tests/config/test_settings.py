import os
from pathlib import Path

import pytest

from entrypoint.config.settings import ConfigError, load_settings


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


def test_reads_nim_variables(monkeypatch, model_dir, tmp_path):
    monkeypatch.setenv("NIM_MODEL_PATH", str(model_dir))
    monkeypatch.setenv("NIM_SERVED_MODEL_NAME", "base")
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path))
    monkeypatch.setenv("NIM_PEFT_REFRESH_INTERVAL", "2.5")
    monkeypatch.setenv("NIM_MAX_GPU_LORAS", "4")
    monkeypatch.setenv("NIM_JSONL_LOGGING", "yes")
    monkeypatch.setenv("NIM_PASSTHROUGH_ARGS", "--seed 7 --enforce-eager")
    settings = load_settings()
    assert settings.model_name == str(model_dir)
    assert settings.served_name == "base"
    assert settings.dynamic and settings.peft_refresh_interval == 2.5
    assert settings.max_gpu_loras == 4 and settings.cpu_loras == 16
    assert settings.jsonl_logging is True
    assert settings.passthrough == ["--seed", "7", "--enforce-eager"]


def test_static_mode_without_interval(monkeypatch, model_dir, tmp_path):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path))
    settings = load_settings()
    assert not settings.dynamic
    assert settings.served_name == str(model_dir)


def test_command_line_overrides_environment(monkeypatch, model_dir):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_SERVER_PORT", "9000")
    assert load_settings(server_port=9100).server_port == 9100


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("NIM_PEFT_REFRESH_INTERVAL", "soon", "NIM_PEFT_REFRESH_INTERVAL=soon: must be a number"),
        ("NIM_PEFT_REFRESH_INTERVAL", "-5", "NIM_PEFT_REFRESH_INTERVAL=-5: must be a number of "
         "seconds above 0"),
        ("NIM_SERVER_PORT", "70000", "NIM_SERVER_PORT=70000: must be a TCP port"),
        ("NIM_SERVER_PORT", "http", "NIM_SERVER_PORT=http: must be a whole number"),
        ("NIM_MAX_GPU_LORAS", "0", "NIM_MAX_GPU_LORAS=0: must be a whole number of at least 1"),
        ("NIM_JSONL_LOGGING", "maybe", "NIM_JSONL_LOGGING=maybe: expected one of"),
        ("NIM_LOG_LEVEL", "loud", "NIM_LOG_LEVEL=loud: must be one of"),
        ("NIM_PEFT_SOURCE", "/no/such/folder", "NIM_PEFT_SOURCE=/no/such/folder: no such folder"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, model_dir, tmp_path, variable, value,
                                      expected):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path))
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_missing_model_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NIM_MODEL_NAME", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"^NIM_MODEL_NAME=.*absent: no such folder"):
        load_settings()


def test_model_is_required(monkeypatch):
    with pytest.raises(ConfigError, match="^NIM_MODEL_NAME is not set"):
        load_settings()


def test_cpu_loras_below_gpu_loras(monkeypatch, model_dir):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_MAX_GPU_LORAS", "8")
    monkeypatch.setenv("NIM_MAX_CPU_LORAS", "4")
    with pytest.raises(ConfigError, match="NIM_MAX_CPU_LORAS=4 is below NIM_MAX_GPU_LORAS=8"):
        load_settings()


def test_interval_needs_a_source(monkeypatch, model_dir):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_PEFT_REFRESH_INTERVAL", "5")
    with pytest.raises(ConfigError, match="NIM_PEFT_SOURCE is not"):
        load_settings()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to check as another user")
def test_a_model_the_user_cannot_read_is_one_line_with_the_fix(monkeypatch, tiny_model):
    """As in the image (uid 1000) with a model saved by root (safetensors writes 0600)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as top:  # under /tmp: others may enter it
        os.chmod(top, 0o755)
        model = Path(top) / "model"
        shutil.copytree(tiny_model, model)
        os.chmod(model, 0o755)
        (model / "model.safetensors").chmod(0o600)
        monkeypatch.setenv("NIM_MODEL_NAME", str(model))
        os.setegid(65534)
        os.seteuid(65534)
        try:
            with pytest.raises(ConfigError) as info:
                load_settings()
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert str(info.value) == (
            f"NIM_MODEL_NAME={model}: model.safetensors cannot be read by this user (uid 65534); "
            "make the model readable (chmod -R a+rX) or run as its owner (docker run -u UID:GID)")


def test_api_allowed_paths_are_absolute_and_resolved(monkeypatch, model_dir, tmp_path):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    source, store = tmp_path / "loras", tmp_path / "store"
    source.mkdir()
    store.mkdir()
    (tmp_path / "link").symlink_to(store)
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(source))
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("NIM_PEFT_API_ALLOWED_PATHS", f"{tmp_path / 'link'}::{models}")
    assert load_settings().api_roots == (source.resolve(), store.resolve(), models.resolve())
    monkeypatch.setenv("NIM_PEFT_API_ALLOWED_PATHS", f"{models}:relative/store")
    with pytest.raises(ConfigError, match=r"^NIM_PEFT_API_ALLOWED_PATHS=.*'relative/store' is "
                       "not an absolute path"):
        load_settings()


@pytest.mark.parametrize(("listed", "message"), [
    ("/", "is the root folder, which would let runtime loads read any file"),
    ("/var/../", "is the root folder"),
    ("/no/such/folder", "no such folder; create it, mount it, or leave it out"),
])
def test_api_allowed_paths_that_allow_everything_or_nothing_are_refused(
        monkeypatch, model_dir, tmp_path, listed, message):
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path))
    monkeypatch.setenv("NIM_PEFT_API_ALLOWED_PATHS", f"{tmp_path}:{listed}")
    with pytest.raises(ConfigError, match=f"^NIM_PEFT_API_ALLOWED_PATHS=.*{message}"):
        load_settings()


def test_api_allowed_paths_also_list_uri_prefixes(monkeypatch, model_dir, tmp_path):
    """Folders and s3:// or hf:// prefixes, separated by ':' or ',' (a URI's `://` is not a
    separator); a prefix in a form the API could be tricked around is refused at start."""
    monkeypatch.setenv("NIM_MODEL_NAME", str(model_dir))
    monkeypatch.setenv("NIM_PEFT_SOURCE", str(tmp_path))
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("NIM_PEFT_API_ALLOWED_PATHS", f"{store}:s3://bucket/loras,hf://acme:")
    settings = load_settings()
    assert settings.api_allowed_paths == [str(store)]
    assert settings.api_allowed_uris == ["s3://bucket/loras", "hf://acme"]
    assert settings.api_roots == (tmp_path.resolve(), store.resolve())
    for bad, message in (("hf://acme/repo/sub", "more than an organisation"),
                         ("s3://bucket/../other", r"'\.\.' segment"),
                         ("s3://bucket/%2e%2e", "'%'")):
        monkeypatch.setenv("NIM_PEFT_API_ALLOWED_PATHS", f"{store}:{bad}")
        with pytest.raises(ConfigError, match=f"^NIM_PEFT_API_ALLOWED_PATHS=.*{message}"):
            load_settings()
