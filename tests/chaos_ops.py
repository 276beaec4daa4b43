"""What the chaos runs do to an adapter folder (shared by the fake-backend and the vLLM run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
FOLDER_CHANGES = ("rename", "replace", "remove", "truncate", "json", "hostile")


def change_folder(kind: str, source: Path, name: str, *, weights: bytes, config: str,
                  aged_json: bool = False) -> None:
    """Apply one of FOLDER_CHANGES to `source/name` (a no-op where it does not apply)."""
    folder = source / name
    if kind == "rename":  # the recommended way: stage beside, then rename into place
        staging = source / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / CONFIG).write_text(config)
        (staging / WEIGHTS).write_bytes(weights)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    elif kind == "replace" and folder.is_dir():  # new weights, atomically, in place
        tmp = folder / ".new"
        tmp.write_bytes(weights)
        tmp.replace(folder / WEIGHTS)
    elif kind == "remove":
        shutil.rmtree(folder, ignore_errors=True)
    elif kind == "truncate" and (folder / WEIGHTS).is_file():
        data = (folder / WEIGHTS).read_bytes()
        (folder / WEIGHTS).write_bytes(data[: len(data) // 3])
    elif kind == "json" and folder.is_dir():
        path = folder / CONFIG
        path.write_text("{broken")
        if aged_json:  # not "still being written": failed at once
            past = os.path.getmtime(path) - 60
            os.utime(path, (past, past))
    elif kind == "hostile":  # a config nested too deep to parse, a FIFO as the weights
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        (folder / CONFIG).write_text("[" * 100_000)
        os.mkfifo(folder / WEIGHTS)
