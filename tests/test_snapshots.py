"""Snapshots cost no second copy of an adapter's bytes where that can be had: a download of ours
is hard-linked, a user's folder cloned copy-on-write (XFS, btrfs), else copied; in every case a
later edit of the source in place never reaches the snapshot."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from entrypoint.adapters.files import CONFIG_FILE
from entrypoint.adapters.folder import inspect_folder
from entrypoint.snapshots import SnapshotStore

WEIGHTS = "adapter_model.safetensors"
MIB = 1 << 20


def sized_adapter(folder: Path, mib: int = 20, seed: int = 7) -> Path:
    """A valid rank-8 adapter of about `mib` MiB (one wide q_proj pair; its weights drawn from
    `seed`)."""
    folder.mkdir(parents=True)
    width = mib * MIB // (2 * 8 * 4)
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    (folder / WEIGHTS).write_bytes(save({
        f"{prefix}.lora_A.weight": rng.standard_normal((8, width), dtype=np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((width, 8), dtype=np.float32)}))
    (folder / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def overwrite_in_place(file: Path) -> None:
    """What an editor or `cp` over an existing file does: the same inode, new bytes."""
    with open(file, "r+b") as out:
        out.seek(1000)
        out.write(b"\0" * 4096)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def test_a_download_is_linked_never_copied_and_outlives_its_download(tmp_path):
    download = sized_adapter(tmp_path / "downloads" / "a-1")
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot = store.take(replace(inspect_folder(download), private=True))
    for name in (CONFIG_FILE, WEIGHTS):
        assert (snapshot / name).stat().st_ino == (download / name).stat().st_ino
    assert store.copied_bytes == 0
    weights = digest(download / WEIGHTS)
    shutil.rmtree(download)  # a newer version replaced it: what the backend loaded stays
    assert inspect_folder(snapshot).valid and digest(snapshot / WEIGHTS) == weights


def test_a_users_folder_is_never_linked_and_an_edit_in_place_misses_the_snapshot(tmp_path):
    folder = sized_adapter(tmp_path / "loras" / "a", mib=2)
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot = store.take(inspect_folder(folder))
    assert (snapshot / WEIGHTS).stat().st_ino != (folder / WEIGHTS).stat().st_ino
    before = digest(snapshot / WEIGHTS)
    overwrite_in_place(folder / WEIGHTS)
    assert digest(snapshot / WEIGHTS) == before != digest(folder / WEIGHTS)


@pytest.fixture
def xfs(tmp_path):
    """A fresh XFS (reflink on) mounted from a file: root, mkfs.xfs and loop devices needed."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("needs root and mkfs.xfs (xfsprogs) to mount an XFS from a file")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as out:
        out.truncate(400 * MIB)
    mount.mkdir()
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
                          capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip(f"cannot make or mount an XFS here: {made.stderr.strip()[:200]}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_folder_on_xfs_is_cloned_copy_on_write(xfs):
    folder = sized_adapter(xfs / "loras" / "a", mib=40)
    store = SnapshotStore(xfs / "cache" / "snapshots")
    os.sync()
    free = free_bytes(xfs)
    snapshot = store.take(inspect_folder(folder))
    os.sync()
    assert free - free_bytes(xfs) < 2 * MIB  # 40 MiB of weights, no second copy on disk
    assert store.copied_bytes == 0
    assert digest(snapshot / WEIGHTS) == digest(folder / WEIGHTS)
    before = digest(snapshot / WEIGHTS)
    overwrite_in_place(folder / WEIGHTS)  # copy-on-write: the clone keeps its bytes
    assert digest(snapshot / WEIGHTS) == before != digest(folder / WEIGHTS)


def test_without_clones_a_folder_is_copied_once(tmp_path, monkeypatch):
    from entrypoint import snapshots

    monkeypatch.setattr(snapshots, "_clone", lambda src, dst: False)  # as on ext4 or tmpfs
    folder = sized_adapter(tmp_path / "loras" / "a", mib=2)
    store = SnapshotStore(tmp_path / "snapshots")
    snapshot = store.take(inspect_folder(folder))
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert store.copied_bytes == size
    assert digest(snapshot / WEIGHTS) == digest(folder / WEIGHTS)
