"""Disk bytes a snapshot costs, per adapter byte, on the filesystem of `--folder`.

Makes `--count` adapters of `--mib` MiB each (seeded), snapshots them the way the reconciler
does (a user's folder; and the same files as a download of ours), and reads the free space
(statvfs, after sync) before and after: 1.0 is a full second copy, about 0 a clone or links.

    .venv/bin/python -m benchmarks.snapshot_bytes --folder /mnt/xfs/bench   # XFS: clones
    .venv/bin/python -m benchmarks.snapshot_bytes                            # here: ext4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.fixtures import machine, save_result
from entrypoint.adapters.folder import inspect_folder
from entrypoint.snapshots import SnapshotStore
from tests.test_snapshots import sized_adapter


def free(path: Path) -> int:
    os.sync()
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def filesystem(path: Path) -> str:
    shown = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                           text=True)
    return shown.stdout.strip() or "unknown"


def snapshot_all(folders: list[Path], store: SnapshotStore, *, private: bool,
                 root: Path) -> float:
    """Disk bytes the snapshots of `folders` took, over their adapters' bytes."""
    adapter_bytes = sum(f.stat().st_size for folder in folders for f in folder.iterdir())
    before = free(root)
    for folder in folders:
        store.take(replace(inspect_folder(folder), private=private))
    return round((before - free(root)) / adapter_bytes, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--mib", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/snapshot_bytes.json"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="snapshot-bytes-", dir=args.folder))
    try:
        folders = [sized_adapter(root / "loras" / f"a{i:03d}", mib=args.mib, seed=i)
                   for i in range(args.count)]  # (each its own weights: none stored once)
        result = {
            "filesystem": filesystem(root), "adapters": args.count, "mib_each": args.mib,
            "folder_snapshot_bytes_per_adapter_byte": snapshot_all(
                folders, SnapshotStore(root / "snapshots-folder"), private=False, root=root),
            "download_snapshot_bytes_per_adapter_byte": snapshot_all(
                folders, SnapshotStore(root / "snapshots-download"), private=True, root=root),
            "machine": machine(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
