"""Counting the files other processes open in some folders (Linux inotify `IN_OPEN`).

Used to count how often the backend reads an adapter's files while it generates: a count, not
a timing, so it is the same on a slow machine and a fast one.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

IN_OPEN = 0x20
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len


class OpenCounter:
    """Counts opens of the files directly in `folders` (by file name) from now on; a folder
    itself being listed (deleting it, say) is not a file open."""

    def __init__(self, folders: Iterable[Path]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN)
            assert wd >= 0, f"{folder}: {os.strerror(ctypes.get_errno())}"
            self.folders[wd] = folder
        self.opens: Counter[str] = Counter()

    def count(self) -> Counter[str]:
        """Every open seen so far: `folder name/file name` -> how many."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.opens
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
                raw = data[offset + EVENT.size:offset + EVENT.size + length]
                offset += EVENT.size + length
                if mask & IN_OPEN and not mask & IN_ISDIR and wd in self.folders:
                    name = raw.rstrip(b"\0").decode(errors="replace")
                    self.opens[f"{self.folders[wd].name}/{name}"] += 1

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
