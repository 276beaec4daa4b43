"""An adapter folder's files, read safely: one listing (fingerprint, sizes), regular files
opened without following a FIFO or a device, weight headers checked without loading tensors.

Must not judge an adapter as a whole (that is `adapters.folder`) or know where folders come from."""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

CONFIG_FILE = "adapter_config.json"


WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
MAX_CONFIG_BYTES = 1 << 20


MAX_HEADER_BYTES = 16 << 20  # a safetensors header: a few KiB per hundred tensors


class Kind(enum.StrEnum):
    """What a problem means for the files: refused as they are, or still being written."""

    INVALID = "invalid"
    UNFINISHED = "unfinished"  # a copy not done yet: looked at again
    UPLOADING = "uploading"  # a store's objects not yet seen unchanged: looked at again
    DOWNLOADING = "downloading"
    DOWNLOAD_FAILED = "download failed"  # tried again after a backoff


class Problem(NamedTuple):
    """What is wrong with a file, and what kind of wrong (code branches on `kind`)."""

    kind: Kind
    text: str


TRUNCATED = Problem(Kind.UNFINISHED, "incomplete: weights file still being written")


def invalid(text: str) -> Problem:
    return Problem(Kind.INVALID, text)


class Listing(NamedTuple):
    """One `scandir` of an adapter folder: its fingerprint, total size and file sizes."""

    fingerprint: str
    size: int
    files: dict[str, int]  # regular files: name -> size
    others: frozenset[str] = frozenset()  # anything else: folders, FIFOs, broken links
    error: str | None = None  # the folder could not be listed (gone, unreadable)
    links: bool = False  # some entry is a symbolic link


def list_folder(path: str) -> Listing:
    """A cheap fingerprint of a folder's files: names, sizes and mtimes (one stat each)."""
    parts = []
    files: dict[str, int] = {}
    others = set()
    links = False
    try:
        with os.scandir(path) as it:
            for entry in it:
                name = entry.name
                links = links or entry.is_symlink()  # (from readdir's type: no system call)
                try:
                    st = entry.stat()  # follows links; a loop or a dangling link raises
                except OSError:
                    others.add(name)
                    parts.append(f"{name}\0?")
                    continue
                parts.append(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}")
                if stat.S_ISREG(st.st_mode):
                    files[name] = st.st_size
                else:
                    others.add(name)
    except OSError as exc:
        return Listing("", 0, {}, frozenset(), exc.strerror or type(exc).__name__)
    parts.sort()
    digest = hashlib.blake2b("\0".join(parts).encode(errors="surrogateescape"),
                             digest_size=12).hexdigest()
    return Listing(digest, sum(files.values()), files, frozenset(others), links=links)


def readable(path: str) -> bool:
    """This process (its effective user, as `open` checks) may read `path`."""
    return os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids)


def open_regular(path: str | Path) -> int:
    """A read descriptor for `path` if it is a regular file, else OSError; never blocks on a
    FIFO (opened non-blocking, checked with fstat)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str, limit: int) -> bytes:
    """Up to `limit` bytes of `path` if it is a regular file."""
    fd = open_regular(path)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def safetensors_problem(path: Path | str, size: int | None = None,
                        rank: int | None = None) -> Problem | None:
    """None when the file is a complete safetensors file; otherwise what is wrong.

    A safetensors file starts with an 8-byte header length and a JSON header whose tensors'
    offsets give the exact size of the file: a shorter file is still being written. With
    `rank` (the config's `r`), the LoRA A and B tensors must have that rank: a config and
    weights from two versions (an overwrite caught half-way) do not pass.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return invalid("adapter_model.safetensors is not a regular file")
            if size is None:
                size = st.st_size
            head = os.read(fd, 8)
            if len(head) < 8:
                return TRUNCATED
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                return invalid("adapter_model.safetensors is not a safetensors file")
            if 8 + header_len > size:
                return TRUNCATED
            header = json.loads(os.read(fd, header_len))
        finally:
            os.close(fd)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return invalid("adapter_model.safetensors is not a safetensors file (bad header)")
    if not isinstance(header, dict):
        return invalid("adapter_model.safetensors has a malformed header")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            return invalid("adapter_model.safetensors has a malformed header")
    expected = 8 + header_len + end
    if size < expected:
        return TRUNCATED
    if size > expected:
        return invalid(f"adapter_model.safetensors is {size} bytes but its header declares "
                       f"{expected}")
    return None if rank is None else _rank_mismatch(header, rank)


def _rank_mismatch(header: dict, rank: int) -> Problem | None:
    """Why the LoRA tensors in a safetensors header do not have rank `rank` (None: they do)."""
    for key, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            continue
        found = shape[0] if key.endswith(".lora_A.weight") else (
            shape[1] if key.endswith(".lora_B.weight") else rank)
        if found != rank:
            return invalid(f"adapter_model.safetensors holds rank-{found} tensors but "
                    f"adapter_config.json says r={rank}: the two files are from different "
                    "versions (an upload or copy caught half-way?); copy both again")
    return None


def zip_problem(path: Path) -> Problem | None:
    """None when a torch `.bin`/`.pt` file (a zip archive) ends with its central directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return invalid(f"{path.name} is not a regular file")
            size = st.st_size
            head = os.pread(fd, 2, 0)
            tail = os.pread(fd, 65_557, max(0, size - 65_557))
        finally:
            os.close(fd)
    except OSError as exc:
        return invalid(f"{path.name} cannot be read ({exc.strerror})")
    if size >= 2 and head != b"PK":
        return invalid(f"{path.name} is not a PyTorch zip checkpoint; save it with "
                       "safetensors")
    if size < 22 or b"PK\x05\x06" not in tail:
        return TRUNCATED
    return None


