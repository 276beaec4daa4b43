import json
import os
import struct
import time
from pathlib import Path

import pytest

from entrypoint.adapters import inspect_folder, safetensors_problem, scan_source
from tests.conftest import copy_adapter, edit_config


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def test_valid_adapter_is_described(library, source):
    folder = inspect_folder(copy_adapter(library / "alpha", source / "alpha"), max_rank=16)
    assert folder.valid and folder.problem is None
    assert folder.rank == 8 and set(folder.target_modules) == {"q_proj", "k_proj", "v_proj",
                                                                "o_proj"}
    assert folder.weights.name == "adapter_model.safetensors"
    assert folder.size > 0 and folder.fingerprint


def test_scan_lists_direct_subfolders_and_ignores_hidden(library, source):
    copy_adapter(library / "alpha", source / "alpha")
    copy_adapter(library / "beta", source / ".beta.tmp")
    (source / "notes.txt").write_text("not an adapter")
    names = [f.name for f in scan_source(source, max_rank=16)]
    assert names == ["alpha"]


def test_truncated_weights_are_pending_not_failed(library, source):
    folder = copy_adapter(library / "alpha", source / "alpha")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    found = inspect_folder(folder)
    assert found.pending and not found.valid
    assert "incomplete" in found.problem


def test_weights_without_config_are_pending(library, source):
    folder = source / "alpha"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (library / "alpha" / "adapter_model.safetensors").read_bytes())
    assert inspect_folder(folder).pending


def test_config_without_weights_is_pending(library, source):
    folder = source / "alpha"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        (library / "alpha" / "adapter_config.json").read_text())
    found = inspect_folder(folder)
    assert found.pending and "adapter_model.safetensors" in found.problem


def test_safetensors_longer_than_declared_is_invalid(library, tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes((library / "alpha" / "adapter_model.safetensors").read_bytes() + b"x")
    assert "header declares" in safetensors_problem(weights)


def test_garbage_weights_are_invalid(tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    assert "not a safetensors file" in safetensors_problem(weights)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias='all' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"r": 64}, "rank 64 is above NIM_MAX_LORA_RANK=16"),
        ({"r": "eight"}, "rank must be a positive whole number"),
    ],
)
def test_configs_the_backend_refuses_are_invalid(library, source, changes, reason):
    folder = copy_adapter(library / "alpha", source / "alpha")
    edit_config(folder, **changes)
    found = inspect_folder(folder, max_rank=16)
    assert not found.pending and not found.valid
    assert reason in found.problem


def test_missing_required_keys(library, source):
    folder = copy_adapter(library / "alpha", source / "alpha")
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["target_modules"], config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert inspect_folder(folder).problem == "adapter_config.json lacks lora_alpha, target_modules"


def test_bad_json_is_pending_while_fresh_then_invalid(library, source):
    folder = copy_adapter(library / "alpha", source / "alpha")
    config = folder / "adapter_config.json"
    config.write_text("{broken")
    fresh = inspect_folder(folder)
    assert fresh.pending and "still being written" in fresh.problem
    old = time.time() - 60
    os.utime(config, (old, old))
    stale = inspect_folder(folder)
    assert not stale.pending and stale.problem == "adapter_config.json is not valid JSON"


def test_scanner_rereads_only_changed_folders(library, source, monkeypatch):
    from entrypoint import adapters

    for name in ("alpha", "beta"):
        copy_adapter(library / name, source / name)
    scanner = adapters.AdapterScanner(source, max_rank=16)
    first = scanner.scan()
    reads = []
    original = adapters.inspect_folder
    monkeypatch.setattr(adapters, "inspect_folder",
                        lambda path, **kw: reads.append(path.name) or original(path, **kw))
    assert scanner.scan() == first and reads == []
    (source / "beta" / "README.md").write_text("changed")
    names = [f.name for f in scanner.scan()]
    assert names == ["alpha", "beta"] and reads == ["beta"]


@pytest.mark.parametrize("name", ["has space", "with:colon", "ümlaut"])
def test_bad_names(library, source, name):
    folder = copy_adapter(library / "alpha", source / name)
    assert "not a valid adapter name" in inspect_folder(folder).problem


def test_name_equal_to_served_model_is_invalid(library, source):
    folder = copy_adapter(library / "alpha", source / "base")
    assert "served model name" in inspect_folder(folder, served_name="base").problem


def test_fingerprint_changes_with_the_files(library, source):
    folder = copy_adapter(library / "alpha", source / "alpha")
    before = inspect_folder(folder).fingerprint
    assert inspect_folder(folder).fingerprint == before
    (folder / "adapter_model.safetensors").write_bytes(
        (library / "beta" / "adapter_model.safetensors").read_bytes())
    assert inspect_folder(folder).fingerprint != before
