"""Naming and confinement rules: which names may name an adapter, how a name or path is shown
in a log line, and whether a path stays within the folders it may be read from.

Never says where a link outside the allowed folders leads."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")  # matched whole (`fullmatch`: no trailing \n)


#: longest adapter name: its snapshot folder adds a 33-character hash to it, within 255 bytes
NAME_MAX_CHARS = 200


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter (said after "folder name" or "lora_name"), or None."""
    if not NAME_PATTERN.fullmatch(name):
        return "is not a valid adapter name; use letters, digits, '.', '_' and '-' only"
    if name.startswith("."):
        return "starts with '.'; hidden names are not adapters"
    if len(name) > NAME_MAX_CHARS:
        return f"is longer than {NAME_MAX_CHARS} characters; use a shorter name"
    return None


def display_name(name: str) -> str:
    """A folder name as logs and JSON can show it (bytes that are not UTF-8 escaped)."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as surrogates
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def within(path: str, roots: Sequence[Path]) -> bool:
    """`path` (already resolved) is one of `roots` or lies under one."""
    return any(path == str(root) or path.startswith(str(root).rstrip("/") + "/")
               for root in roots)


def resolved(path: str) -> str | None:
    """`path` with its links and `..` resolved, or None when a link on the way cannot be read
    (`/proc/1/cwd` as another user: `os.path.realpath` raises PermissionError there)."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return None


def outside_roots(path: str, roots: Sequence[Path],
                  where: str = "the folders adapters may be loaded from") -> str | None:
    """Why the folder `path` may not be loaded from, given the allowed `roots` (resolved), or
    None: it must resolve (links and `..` resolved) under a root, and so must every file in it
    that is a link. (The snapshot checks each file again as it opens it.)

    The reason never says where a link leads: a runtime API caller learns nothing of the
    filesystem outside the allowed folders from it."""
    real = resolved(path)
    shown = display_name(path)
    if real is None or not within(real, roots):  # (one answer: whether it is a link, or
        return f"{shown} is not in {where}"      # one that cannot be read, is not told)
    try:
        with os.scandir(real) as it:
            links = [entry for entry in it if entry.is_symlink()]
    except OSError:
        return None  # missing or unreadable: judged (and named) by inspect_folder
    for entry in links:
        target = resolved(entry.path)
        if target is None or not within(target, roots):
            return (f"{display_name(entry.name)} in {shown} is a link that leads outside "
                    f"{where}")
    return None


def is_folder(entry: os.DirEntry[str]) -> bool:
    """A folder, or a link to one; a link loop or a broken link is not."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def leads_outside(path: str, real_source: str) -> bool:
    """The link `path` leads outside `real_source` (or cannot be followed)."""
    target = resolved(path)
    return target is None or not target.startswith(real_source.rstrip("/") + "/")


