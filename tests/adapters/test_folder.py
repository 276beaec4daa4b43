import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from entrypoint.adapters.files import safetensors_problem
from entrypoint.adapters.folder import inspect_folder
from entrypoint.adapters.rank import RankLimit
from entrypoint.sources.folder import scan_source
from tests.conftest import copy_adapter, edit_config


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    return folder


def test_valid_adapter_is_described(library, source):
    folder = inspect_folder(copy_adapter(library / "alpha", source / "alpha"), limit=RankLimit(16))
    assert folder.valid and folder.problem is None
    assert folder.rank == 8 and set(folder.target_modules) == {"q_proj", "k_proj", "v_proj",
                                                                "o_proj"}
    assert folder.weights.name == "adapter_model.safetensors"
    assert folder.size > 0 and folder.fingerprint


def test_scan_lists_direct_subfolders_and_ignores_hidden(library, source):
    copy_adapter(library / "alpha", source / "alpha")
    copy_adapter(library / "beta", source / ".beta.tmp")
    (source / "notes.txt").write_text("not an adapter")
    names = [f.name for f in scan_source(source, limit=RankLimit(16))]
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
    assert "header declares" in safetensors_problem(weights).text


def test_garbage_weights_are_invalid(tmp_path):
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}")
    assert "not a safetensors file" in safetensors_problem(weights).text


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
    found = inspect_folder(folder, limit=RankLimit(16))
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
    from entrypoint.sources import folder as adapters

    for name in ("alpha", "beta"):
        copy_adapter(library / name, source / name)
    scanner = adapters.FolderSource(source, limit=RankLimit(16))
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


# ---- hostile folders: the scan never raises, never blocks, and says what is wrong ----

def _old(path: Path) -> Path:
    """Make `path` look written long ago (not a copy in progress)."""
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def _with_config(library: Path, folder: Path, text: str | bytes) -> Path:
    copy_adapter(library / "alpha", folder)
    config = folder / "adapter_config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    _old(config)
    return folder


@pytest.fixture
def deep_tree():
    """Make folder trees deeper than Python's recursion limit (and remove them with `rm`,
    which, unlike shutil.rmtree here, does not recurse)."""
    made: list[Path] = []

    def make(root: Path, depth: int) -> None:
        made.append(root)
        cwd = os.getcwd()
        os.makedirs(root)
        os.chdir(root)
        try:
            for _ in range(depth):
                os.mkdir("d")
                os.chdir("d")
        finally:
            os.chdir(cwd)

    yield make
    for root in made:
        subprocess.run(["rm", "-rf", str(root)], check=False)


HOSTILE_CONFIGS = {
    "nested": ("[" * 200_000, "not valid JSON"),
    "binary": (bytes(range(256)) * 64, "not valid JSON"),
    "r-word": (json.dumps({"r": "eight", "lora_alpha": 16, "target_modules": ["q_proj"]}),
               "r='eight'"),
    "modules-int": (json.dumps({"r": 8, "lora_alpha": 16, "target_modules": 5}),
                    "target_modules=5"),
    "alpha-null": (json.dumps({"r": 8, "lora_alpha": None, "target_modules": ["q_proj"]}),
                   "lora_alpha=None"),
    "modules-mixed": (json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", 3]}),
                      "target_modules="),
    "save-dicts": (json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                               "modules_to_save": [{"a": 1}]}), "modules_to_save="),
    "bias-list": (json.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
                              "bias": ["all"]}), "bias=['all'] is not supported"),
    "a-list": ("[1, 2, 3]", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CONFIGS))
def test_hostile_configs_get_a_reason(library, source, case):
    text, reason = HOSTILE_CONFIGS[case]
    found = inspect_folder(_with_config(library, source / case, text), limit=RankLimit(16))
    assert not found.valid and not found.pending
    assert reason in found.problem


def test_huge_config_is_refused_without_reading_it(library, source):
    folder = copy_adapter(library / "alpha", source / "huge")
    with (folder / "adapter_config.json").open("wb") as handle:
        handle.truncate(64 << 20)  # 64 MiB
    found = inspect_folder(folder, limit=RankLimit(16))
    assert "adapter_config.json is 67108864 bytes" in found.problem


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_where_a_file_belongs_never_blocks(library, source, file):
    folder = copy_adapter(library / "alpha", source / "fifo")
    (folder / file).unlink()
    os.mkfifo(folder / file)  # opening it for reading would block forever
    found = _in_thread(lambda: inspect_folder(folder, limit=RankLimit(16)))
    assert f"{file} is not a regular file" in found.problem and not found.pending


def test_links_loops_and_folders_where_files_belong(library, source):
    loop = copy_adapter(library / "alpha", source / "loop")
    (loop / "adapter_model.safetensors").unlink()
    (loop / "adapter_model.safetensors").symlink_to(loop / "adapter_model.safetensors")
    folderish = copy_adapter(library / "alpha", source / "folderish")
    (folderish / "adapter_config.json").unlink()
    (folderish / "adapter_config.json").mkdir()
    (source / "cycle").symlink_to(source / "cycle")  # a loop as an entry: not an adapter
    (source / "notes.txt").write_text("a file where a folder is expected: not an adapter")
    found = {f.name: f for f in scan_source(source, limit=RankLimit(16))}
    assert set(found) == {"loop", "folderish"}
    assert "adapter_model.safetensors is not a regular file" in found["loop"].problem
    assert "adapter_config.json is not a regular file" in found["folderish"].problem


def test_a_link_to_a_folder_outside_is_refused_one_inside_is_served(library, source, tmp_path):
    outside = copy_adapter(library / "alpha", tmp_path / "elsewhere")
    copy_adapter(library / "beta", source / ".store")
    (source / "escape").symlink_to(outside)
    (source / "inside").symlink_to(source / ".store")
    found = {f.name: f for f in scan_source(source, limit=RankLimit(16))}
    assert "outside NIM_PEFT_SOURCE" in found["escape"].problem and not found["escape"].valid
    assert found["inside"].valid


def test_a_name_that_is_not_utf8_is_refused_and_printable(library, source):
    raw = os.fsencode(source) + b"/caf\xe9"
    os.mkdir(raw)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(raw + b"/" + name.encode(), "wb") as handle:
            handle.write((library / "alpha" / name).read_bytes())
    (found,) = scan_source(source, limit=RankLimit(16))
    assert "not a valid adapter name" in found.problem
    assert json.dumps({"name": found.name}, ensure_ascii=False).encode()  # can be shown
    assert found.name == "caf\\xe9"


def test_a_very_deep_empty_tree_is_not_walked(source, deep_tree):
    deep_tree(source / "deep", 1500)
    started = time.monotonic()
    (found,) = _in_thread(lambda: scan_source(source, limit=RankLimit(16)))
    assert time.monotonic() - started < 2
    assert "no adapter files directly in this folder" in found.problem


def test_empty_folder_is_pending_and_a_vanished_one_is_not_failed(library, source):
    (source / "empty").mkdir()
    assert inspect_folder(source / "empty").pending
    folder = copy_adapter(library / "alpha", source / "gone")
    from entrypoint.adapters.files import list_folder

    listing = list_folder(str(folder))
    shutil.rmtree(folder)  # removed between listing and reading
    found = inspect_folder(folder, _listing=listing)
    assert found.pending and not found.valid


def test_everything_hostile_at_once_leaves_good_adapters_valid(library, source, deep_tree):
    for case, (text, _) in HOSTILE_CONFIGS.items():
        _with_config(library, source / case, text)
    os.mkfifo(source / "pipe")
    deep_tree(source / "deep", 1500)
    copy_adapter(library / "alpha", source / "good")
    found = {f.name: f for f in _in_thread(lambda: scan_source(source, limit=RankLimit(16)))}
    assert found["good"].valid
    assert all(not f.valid for name, f in found.items() if name != "good")


def test_a_missing_source_is_a_problem_not_an_empty_folder(library, tmp_path):
    from entrypoint.sources.folder import FolderSource

    source = tmp_path / "mount"
    source.mkdir()
    copy_adapter(library / "alpha", source / "alpha")
    scanner = FolderSource(source, limit=RankLimit(16))
    assert [f.name for f in scanner.scan()] == ["alpha"] and scanner.source_problem is None
    source.rename(tmp_path / "unmounted")
    assert [f.name for f in scanner.scan()] == ["alpha"]  # what it knew, not "nothing"
    assert scanner.source_problem == "is gone"
    (tmp_path / "unmounted").rename(source)
    scanner.scan()
    assert scanner.source_problem is None


def _in_thread(work, timeout: float = 10.0):
    """Run `work` in a thread; fail (instead of hanging the suite) if it blocks."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(work).result(timeout=timeout)
    finally:
        pool.shutdown(wait=False)


def test_rank_messages_name_the_variable_only_when_the_user_set_it(library, source):
    copy_adapter(library / "big", source / "big")  # rank 64
    set_by_user = inspect_folder(source / "big", limit=RankLimit(16))
    assert set_by_user.problem == ("rank 64 is above NIM_MAX_LORA_RANK=16; raise "
                                   "NIM_MAX_LORA_RANK or use a smaller adapter")
    derived = RankLimit(16, derived=True, engine="vllm", engine_max=512)
    later = inspect_folder(source / "big", limit=derived)
    assert later.problem is not None and "NIM_MAX_LORA_RANK" not in later.problem
    assert later.problem.startswith("rank 64 is above this server's rank limit 16, derived at "
                                    "start")
    assert "restart" in later.problem
    assert derived.problem(1024) == ("rank 1024 is above the largest rank vllm allows (512); "
                                     "use an adapter of rank 512 or less")
    assert derived.problem(16) is None and RankLimit(64).problem(64) is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to check as another user")
def test_a_file_the_user_cannot_read_is_named_with_the_fix(library):
    """As in the image (uid 1000) with adapter files copied by root (0600)."""
    import tempfile

    with tempfile.TemporaryDirectory() as top:  # under /tmp: others may enter it
        os.chmod(top, 0o755)
        folder = copy_adapter(library / "alpha", Path(top) / "secret")
        (folder / "adapter_model.safetensors").chmod(0o600)
        os.chmod(folder, 0o755)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            found = inspect_folder(folder)
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert found.problem == (
            "adapter_model.safetensors cannot be read by this user (uid 65534); make the "
            "adapter's files readable (chmod -R a+rX) or run as their owner")
        (folder / "adapter_model.safetensors").chmod(0o644)  # the fix named: now valid
        assert inspect_folder(folder).valid
