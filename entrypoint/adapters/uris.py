"""Which remote URIs runtime API loads may name: NIM_PEFT_API_ALLOWED_PATHS also lists
`s3://BUCKET[/PREFIX]` and `hf://ORG[/REPO]` prefixes, beside folders.

The list is separated by ',' or by ':' (today's folder lists keep working; a URI's own `://` is
not a separator). A URI is allowed when it is in a canonical form (no `%`-escapes, no `.` or
`..` segments, no empty segments, no query, fragment, backslash or control character) and its
segments begin with those of a listed prefix (`s3://b/lo` allows `s3://b/lo/x`, not
`s3://b/loras`). No network work; only `allowed_problem` looks at the file system.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence

from entrypoint.sources.s3_client import INSTALL

REMOTE = ("s3://", "hf://")
SEPARATOR = re.compile(r",|:(?!//)")
VARIABLE = "NIM_PEFT_API_ALLOWED_PATHS"


def split_allowed(value: str | None) -> list[str]:
    """The entries of NIM_PEFT_API_ALLOWED_PATHS (empty ones left out)."""
    return [part.strip() for part in SEPARATOR.split(value or "") if part.strip()]


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE)


def segments(uri: str) -> tuple[str, list[str]] | str:
    """A remote URI's scheme and path segments, or why it is not in canonical form."""
    scheme = next((s for s in REMOTE if uri.startswith(s)), None)
    if scheme is None:
        return "is not an s3:// or hf:// URI"
    if any(ord(c) < 33 or c == "\x7f" for c in uri) or any(c in uri for c in "%\\?#"):
        return "holds a space, a control character, '%', '\\', '?' or '#'"
    parts = uri[len(scheme):].rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' segment"
    return scheme, parts


def entry_problem(entry: str) -> str | None:
    """Why an s3:// or hf:// entry of the allowed list cannot be used, or None."""
    found = segments(entry)
    if isinstance(found, str):
        return found
    scheme, parts = found
    if scheme == "hf://" and len(parts) > 2:
        return "names more than an organisation and a repository (hf://ORG or hf://ORG/REPO)"
    return None


def uri_problem(uri: str, allowed: Sequence[str]) -> str | None:
    """Why a runtime API load may not fetch `uri`, given the allowed entries, or None."""
    found = segments(uri)
    if isinstance(found, str):
        return (f"{uri[:200]!r} {found}; only plain URIs under a prefix listed in {VARIABLE} "
                "are fetched")
    scheme, parts = found
    for entry in allowed:
        prefix = segments(entry)
        if not isinstance(prefix, str) and prefix[0] == scheme and \
                parts[:len(prefix[1])] == prefix[1]:
            return None
    listed = ", ".join(e for e in allowed if e.startswith(scheme)) or "none"
    return (f"{uri[:200]!r} is not under a prefix listed in {VARIABLE} ({scheme} "
            f"prefixes listed: {listed}); add one there to let the API fetch it")


def allowed_problem(value: str | None) -> str | None:
    """Why NIM_PEFT_API_ALLOWED_PATHS cannot be used (one line), or None."""
    for entry in split_allowed(value):
        where = f"{VARIABLE}={value}: {entry[:200]!r}"
        if is_remote(entry):
            problem = entry_problem(entry)
            if problem is None and entry.startswith("s3://") and \
                    importlib.util.find_spec("boto3") is None:
                problem = f"needs the S3 client (boto3), which is not installed; {INSTALL}"
            if problem is None:
                continue
        elif not os.path.isabs(entry):
            problem = "is not an absolute path, an s3:// or an hf:// prefix"
        elif not os.path.isdir(entry):
            problem = "is no such folder; create it, mount it, or leave it out"
        elif os.path.realpath(entry) == "/":
            problem = ("is the root folder, which would let runtime loads read any file on "
                       "this machine; list the folders adapters are kept in")
        else:
            continue
        return f"{where} {problem}"
    return None
