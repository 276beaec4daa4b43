"""Snapshots: private, content-named copies of adapter folders that the backend loads from.

Edits to or removal of a source folder can then never corrupt a served adapter, and changed
weights always arrive under a new path (vLLM keys its prefix cache on the path). Only file work
here: no backend calls, no registry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from .adapters import CONFIG_FILE, WEIGHT_FILES, AdapterFolder, inspect_folder

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SNAPSHOT_FILES = (CONFIG_FILE, *WEIGHT_FILES, "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "added_tokens.json")


class SnapshotChanged(Exception):
    """The source folder changed while it was being copied; try again when it settles."""


class SnapshotStore:
    """Snapshots under `<NIM_CACHE_PATH>/snapshots/<name>-<content hash>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def take(self, folder: AdapterFolder) -> Path:
        """Copy the adapter's files into a snapshot named by their content; return its path.

        Reads each source file once (hashing while copying), re-validates the copy, and raises
        `SnapshotChanged` if the source folder's fingerprint moved meanwhile.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{folder.name}.{os.getpid()}.{id(folder):x}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        digest = hashlib.blake2b(digest_size=16)
        try:
            for name in SNAPSHOT_FILES:
                source = folder.path / name
                if not source.is_file():
                    continue
                digest.update(name.encode() + b"\0")
                with source.open("rb") as src, (tmp / name).open("wb") as dst:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
            copy = inspect_folder(tmp)
            now = inspect_folder(folder.path).fingerprint
            if now != folder.fingerprint or not copy.valid:
                raise SnapshotChanged(copy.problem or "files changed while copying")
            final = self.root / f"{folder.name}-{digest.hexdigest()}"
            if final.exists():
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def collect(self, keep: set[Path]) -> int:
        """Delete every snapshot not in `keep`; returns how many were deleted."""
        if not self.root.is_dir():
            return 0
        removed = 0
        keep = {p.resolve() for p in keep}
        for entry in self.root.iterdir():
            if entry.resolve() in keep or not entry.is_dir():
                continue
            if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < 600:
                continue  # a snapshot being written right now
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        return removed

    def remove_all(self) -> None:
        """Delete this store's folder and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)
