"""Adapters: discovery and validation of adapter folders, as plain data.

Lists the direct sub-folders of NIM_PEFT_SOURCE and describes each as an `AdapterFolder` (name,
rank, target modules, fingerprint, problem). Reads files only; never talks to a backend.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_CONFIG_BYTES = 1 << 20
# modules_to_save entries vLLM accepts (it only keeps classifier heads).
ALLOWED_MODULES_TO_SAVE = {"classifier", "score"}
RECENT_WRITE_SECS = 2.0
REFUSED_INIT = ("pissa", "olora", "loftq", "corda", "eva")


@dataclass(frozen=True)
class AdapterFolder:
    """One sub-folder of the adapter source and what validation found in it.

    `problem` is None for a valid adapter. `pending` marks a folder that looks like it is still
    being copied (not a failure: it is looked at again on the next scan).
    """

    name: str
    path: Path
    fingerprint: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    weights: Path | None = None
    size: int = 0
    problem: str | None = None
    pending: bool = False
    config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def valid(self) -> bool:
        return self.problem is None and not self.pending


class _Listing(NamedTuple):
    """One `scandir` of an adapter folder: its fingerprint, total size and file sizes."""

    fingerprint: str
    size: int
    files: dict[str, int]  # name -> size


def _list_folder(path: str) -> _Listing:
    """A cheap fingerprint of a folder's files: names, sizes and mtimes (one stat each)."""
    parts = []
    files: dict[str, int] = {}
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except OSError:
                    continue
                parts.append(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}")
                if entry.is_file():
                    files[entry.name] = st.st_size
    except OSError:
        return _Listing("", 0, {})
    parts.sort()
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()
    return _Listing(digest, sum(files.values()), files)


def safetensors_problem(path: Path | str, size: int | None = None) -> str | None:
    """None when the file is a complete safetensors file; otherwise what is wrong.

    A safetensors file starts with an 8-byte header length and a JSON header whose tensors'
    offsets give the exact size of the file: a shorter file is still being written.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if size is None:
                size = os.fstat(fd).st_size
            head = os.read(fd, 8)
            if len(head) < 8:
                return "incomplete: weights file still being written"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > 100_000_000:
                return "adapter_model.safetensors is not a safetensors file"
            if 8 + header_len > size:
                return "incomplete: weights file still being written"
            header = json.loads(os.read(fd, header_len))
        finally:
            os.close(fd)
    except (OSError, ValueError, UnicodeDecodeError):
        return "adapter_model.safetensors is not a safetensors file (bad header)"
    if not isinstance(header, dict):
        return "adapter_model.safetensors has a malformed header"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            return "adapter_model.safetensors has a malformed header"
    expected = 8 + header_len + end
    if size < expected:
        return "incomplete: weights file still being written"
    if size > expected:
        return f"adapter_model.safetensors is {size} bytes but its header declares {expected}"
    return None


def zip_problem(path: Path) -> str | None:
    """None when a torch `.bin`/`.pt` file (a zip archive) ends with its central directory."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(2)
            handle.seek(max(0, size - 65_557))
            tail = handle.read()
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror})"
    if size >= 2 and head != b"PK":
        return f"{path.name} is not a PyTorch zip checkpoint; save it with safetensors"
    if size < 22 or b"PK\x05\x06" not in tail:
        return "incomplete: weights file still being written"
    return None


def _recently_written(path: Path) -> bool:
    """True when `path` changed in the last few seconds (a copy may still be writing it)."""
    try:
        return time.time() - path.stat().st_mtime < RECENT_WRITE_SECS
    except OSError:
        return False


def config_problem(config: dict, *, max_rank: int | None) -> str | None:
    """None when vLLM would accept this adapter_config.json; otherwise why not."""
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        return f"adapter_config.json lacks {', '.join(missing)}"
    rank = config["r"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return f"adapter_config.json has r={rank!r}; the rank must be a positive whole number"
    if max_rank is not None and rank > max_rank:
        return (
            f"rank {rank} is above NIM_MAX_LORA_RANK={max_rank}; raise NIM_MAX_LORA_RANK or use "
            "a smaller adapter"
        )
    targets = config["target_modules"]
    if not targets or not isinstance(targets, str | list):
        return "adapter_config.json has no target_modules"
    if config.get("use_dora"):
        return "DoRA adapters (use_dora) are not supported by the backend"
    if config.get("bias", "none") not in (None, "none"):
        return f"bias={config['bias']!r} is not supported; train with bias='none'"
    extra = set(config.get("modules_to_save") or []) - ALLOWED_MODULES_TO_SAVE
    if extra:
        return f"modules_to_save={sorted(extra)} is not supported by the backend"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REFUSED_INIT):
        return f"init_lora_weights={init!r} adapters are not supported by the backend"
    return None


def inspect_folder(
    path: Path,
    *,
    max_rank: int | None = None,
    served_name: str | None = None,
    _listing: _Listing | None = None,
) -> AdapterFolder:
    """Validate one adapter folder and describe it."""
    name = path.name
    folder = str(path)
    fingerprint, size, files = _listing or _list_folder(folder)
    base = {"name": name, "path": path, "fingerprint": fingerprint, "size": size}
    if not NAME_PATTERN.match(name):
        return AdapterFolder(
            **base,
            problem="folder name is not a valid adapter name; use letters, digits, '.', '_' "
            "and '-' only",
        )
    if served_name and name == served_name:
        return AdapterFolder(
            **base, problem="folder name equals the served model name; rename the folder"
        )
    weights_name = next((w for w in WEIGHT_FILES if w in files), None)
    weights = path / weights_name if weights_name else None
    if CONFIG_FILE not in files:
        if weights is not None or files:
            return AdapterFolder(**base, weights=weights, pending=True,
                                 problem="incomplete: adapter_config.json not there yet")
        return AdapterFolder(**base, pending=True, problem="empty folder")
    try:
        fd = os.open(os.path.join(folder, CONFIG_FILE), os.O_RDONLY)
        try:  # read what the listing saw (a fixed 1 MiB buffer per read costs more than I/O)
            raw = os.read(fd, min(files[CONFIG_FILE], MAX_CONFIG_BYTES) + 1)
        finally:
            os.close(fd)
        config = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError, UnicodeDecodeError):
        config = None
    if config is None:
        if _recently_written(path / CONFIG_FILE):
            return AdapterFolder(**base, pending=True,
                                 problem="incomplete: adapter_config.json still being written")
        return AdapterFolder(**base, problem="adapter_config.json is not valid JSON")
    if not isinstance(config, dict):
        return AdapterFolder(**base, problem="adapter_config.json is not a JSON object")
    targets = config.get("target_modules")
    described = {
        **base,
        "rank": config.get("r") if isinstance(config.get("r"), int) else None,
        "alpha": config.get("lora_alpha"),
        "target_modules": tuple([targets] if isinstance(targets, str) else targets or ()),
        "weights": weights,
        "config": config,
    }
    problem = config_problem(config, max_rank=max_rank)
    if problem is None and weights is None:
        return AdapterFolder(
            **described, pending=True, problem="incomplete: no adapter_model.safetensors yet"
        )
    if problem is None and weights is not None:
        if weights_name == WEIGHT_FILES[0]:
            problem = safetensors_problem(os.path.join(folder, weights_name), files[weights_name])
        else:
            problem = zip_problem(weights)
        if problem and problem.startswith("incomplete"):
            return AdapterFolder(**described, pending=True, problem=problem)
    return AdapterFolder(**described, problem=problem)


def scan_source(
    source: Path, *, max_rank: int | None = None, served_name: str | None = None
) -> list[AdapterFolder]:
    """Every adapter folder directly under `source` (hidden ones skipped), sorted by name."""
    return AdapterScanner(source, max_rank=max_rank, served_name=served_name).scan()


class AdapterScanner:
    """Scans a source folder again and again; re-reads a folder only when its fingerprint moves.

    A pass over unchanged folders costs one `scandir` per folder and one `stat` per file. Results
    are kept only for folders that still exist, so memory follows the folder, not its history.
    """

    def __init__(
        self, source: Path, *, max_rank: int | None = None, served_name: str | None = None
    ) -> None:
        self.source = source
        self.max_rank = max_rank
        self.served_name = served_name
        self._known: dict[str, AdapterFolder] = {}

    def scan(self) -> list[AdapterFolder]:
        # Thousands of small acyclic objects: the cycle collector would only slow this down.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._scan()
        finally:
            if collecting:
                gc.enable()

    def _scan(self) -> list[AdapterFolder]:
        try:
            with os.scandir(self.source) as it:
                entries = [e for e in it if not e.name.startswith(".") and e.is_dir()]
        except OSError:
            entries = []
        known: dict[str, AdapterFolder] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            listing = _list_folder(entry.path)
            old = self._known.get(entry.name)
            if old is not None and old.fingerprint == listing.fingerprint and not old.pending:
                known[entry.name] = old
            else:
                known[entry.name] = inspect_folder(
                    Path(entry.path), max_rank=self.max_rank, served_name=self.served_name,
                    _listing=listing,
                )
        self._known = known
        return list(known.values())
