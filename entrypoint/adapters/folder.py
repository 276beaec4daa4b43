"""Adapters: discovery and validation of adapter folders, as plain data.

Lists the direct sub-folders of NIM_PEFT_SOURCE and describes each as an `AdapterFolder` (name,
rank, target modules, fingerprint, problem). Reads files only; never talks to a backend.
"""

from __future__ import annotations

import enum
import errno
import gc
import hashlib
import json
import os
import re
import stat
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")  # matched whole (`fullmatch`: no trailing \n)
#: longest adapter name: its snapshot folder adds a 33-character hash to it, within 255 bytes
NAME_MAX_CHARS = 200
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # a safetensors header: a few KiB per hundred tensors
# modules_to_save entries vLLM accepts (it only keeps classifier heads).
ALLOWED_MODULES_TO_SAVE = {"classifier", "score"}
RECENT_WRITE_SECS = 2.0
REFUSED_INIT = ("pissa", "olora", "loftq", "corda", "eva")


class Origin(enum.StrEnum):
    """Where an adapter comes from."""

    FOLDER = "folder"  # a sub-folder of NIM_PEFT_SOURCE
    API = "api"  # loaded through the runtime API (`POST /v1/load_lora_adapter`)


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
    origin: Origin = Origin.FOLDER
    url: str = ""  # the object URL an adapter from an s3:// source was downloaded from
    #: the fingerprint of the files at `path` when `fingerprint` names another thing (an s3://
    #: adapter's is its objects' keys, sizes and ETags; its download is checked by this one)
    local_fingerprint: str = ""

    @property
    def location(self) -> str | Path:
        """Where its files come from, as its user knows it: the object URL of an s3://
        adapter (not its download folder), else its folder."""
        return self.url or self.path

    @property
    def files_fingerprint(self) -> str:
        """What `list_folder(path)` gives while the files at `path` are unchanged."""
        return self.local_fingerprint or self.fingerprint

    @property
    def valid(self) -> bool:
        return self.problem is None and not self.pending


@dataclass(frozen=True)
class RankLimit:
    """The largest adapter rank a server accepts, and where that number came from.

    Computed once at start (`launch.rank_limit`) and used by every check: the start-up scan,
    the watcher's scans and `check-adapters`. Its messages name NIM_MAX_LORA_RANK only when the
    user set it.
    """

    value: int
    derived: bool = False  # False: NIM_MAX_LORA_RANK set it
    engine: str = ""  # the backend whose largest rank bounds a derived limit
    engine_max: int = 0
    allowed: tuple[int, ...] = ()  # the limits the engine accepts (empty: any)

    def problem(self, rank: int) -> str | None:
        """None when an adapter of `rank` is accepted; otherwise why not and what to do."""
        if rank <= self.value:
            return None
        if not self.derived:
            return (f"rank {rank} is above NIM_MAX_LORA_RANK={self.value}; raise "
                    "NIM_MAX_LORA_RANK or use a smaller adapter")
        if rank > self.engine_max:
            return (f"rank {rank} is above the largest rank {self.engine} allows "
                    f"({self.engine_max}); use an adapter of rank {self.engine_max} or less")
        return (f"rank {rank} is above this server's rank limit {self.value}, derived at start "
                "from the adapters present then; restart the server to serve it")

    def engine_rank(self, rank: int) -> int:
        """The smallest rank limit the engine allows that covers `rank`."""
        allowed = [r for r in self.allowed if r >= rank]
        return allowed[0] if allowed else rank

    def apply(self, folder: AdapterFolder) -> AdapterFolder:
        """`folder`, marked invalid when its rank is above the limit."""
        problem = self.problem(folder.rank) if folder.valid and folder.rank else None
        return folder if problem is None else replace(folder, problem=problem)

    def describe(self) -> str:
        if not self.derived:
            return f"{self.value} (NIM_MAX_LORA_RANK)"
        return (f"{self.value} (derived from the adapters found at start; {self.engine} "
                f"allows up to {self.engine_max})")


class _Listing(NamedTuple):
    """One `scandir` of an adapter folder: its fingerprint, total size and file sizes."""

    fingerprint: str
    size: int
    files: dict[str, int]  # regular files: name -> size
    others: frozenset[str] = frozenset()  # anything else: folders, FIFOs, broken links
    error: str | None = None  # the folder could not be listed (gone, unreadable)
    links: bool = False  # some entry is a symbolic link


def list_folder(path: str) -> _Listing:
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
        return _Listing("", 0, {}, frozenset(), exc.strerror or type(exc).__name__)
    parts.sort()
    digest = hashlib.blake2b("\0".join(parts).encode(errors="surrogateescape"),
                             digest_size=12).hexdigest()
    return _Listing(digest, sum(files.values()), files, frozenset(others), links=links)


def _readable(path: str) -> bool:
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


def _read_regular(path: str, limit: int) -> bytes:
    """Up to `limit` bytes of `path` if it is a regular file."""
    fd = open_regular(path)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def safetensors_problem(path: Path | str, size: int | None = None,
                        rank: int | None = None) -> str | None:
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
                return "adapter_model.safetensors is not a regular file"
            if size is None:
                size = st.st_size
            head = os.read(fd, 8)
            if len(head) < 8:
                return "incomplete: weights file still being written"
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES:
                return "adapter_model.safetensors is not a safetensors file"
            if 8 + header_len > size:
                return "incomplete: weights file still being written"
            header = json.loads(os.read(fd, header_len))
        finally:
            os.close(fd)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return "adapter_model.safetensors is not a safetensors file (bad header)"
    if not isinstance(header, dict):
        return "adapter_model.safetensors has a malformed header"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            return "adapter_model.safetensors has a malformed header"
    expected = 8 + header_len + end
    if size < expected:
        return "incomplete: weights file still being written"
    if size > expected:
        return f"adapter_model.safetensors is {size} bytes but its header declares {expected}"
    return None if rank is None else _rank_mismatch(header, rank)


def _rank_mismatch(header: dict, rank: int) -> str | None:
    """Why the LoRA tensors in a safetensors header do not have rank `rank` (None: they do)."""
    for key, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) != 2:
            continue
        found = shape[0] if key.endswith(".lora_A.weight") else (
            shape[1] if key.endswith(".lora_B.weight") else rank)
        if found != rank:
            return (f"adapter_model.safetensors holds rank-{found} tensors but "
                    f"adapter_config.json says r={rank}: the two files are from different "
                    "versions (an upload or copy caught half-way?); copy both again")
    return None


def zip_problem(path: Path) -> str | None:
    """None when a torch `.bin`/`.pt` file (a zip archive) ends with its central directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return f"{path.name} is not a regular file"
            size = st.st_size
            head = os.pread(fd, 2, 0)
            tail = os.pread(fd, 65_557, max(0, size - 65_557))
        finally:
            os.close(fd)
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


def _shown(value: object) -> str:
    """A config value as an error message shows it: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _target_modules(value: object) -> tuple[str, ...] | None:
    """`target_modules` as a tuple of names (a string is one name or a regex), or None."""
    if isinstance(value, str):
        return (value,) if value else None
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    return None


def config_problem(config: dict, *, limit: RankLimit | None) -> str | None:
    """None when vLLM would accept this adapter_config.json; otherwise why not."""
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        return f"adapter_config.json lacks {', '.join(missing)}"
    rank = config["r"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        return (f"adapter_config.json has r={_shown(rank)}; the rank must be a positive whole "
                "number")
    if limit is not None and (problem := limit.problem(rank)) is not None:
        return problem
    alpha = config["lora_alpha"]
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        return (f"adapter_config.json has lora_alpha={_shown(alpha)}; it must be a number "
                "above 0")
    if _target_modules(config["target_modules"]) is None:
        return (f"adapter_config.json has target_modules={_shown(config['target_modules'])}; "
                "it must name the modules (a list of names, or one name or pattern)")
    if config.get("use_dora"):
        return "DoRA adapters (use_dora) are not supported by the backend"
    if config.get("bias", "none") not in (None, "none"):
        return f"bias={_shown(config['bias'])} is not supported; train with bias='none'"
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        return (f"adapter_config.json has modules_to_save={_shown(saved)}; it must be a list "
                "of module names")
    extra = set(saved) - ALLOWED_MODULES_TO_SAVE
    if extra:
        return f"modules_to_save={sorted(extra)} is not supported by the backend"
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REFUSED_INIT):
        return f"init_lora_weights={init!r} adapters are not supported by the backend"
    return None


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


def inspect_folder(
    path: Path,
    *,
    limit: RankLimit | None = None,
    served_name: str | None = None,
    name: str | None = None,
    complete: bool = False,
    _listing: _Listing | None = None,
) -> AdapterFolder:
    """Validate one adapter folder and describe it. Never raises, never blocks on content.

    The adapter's name is the folder's unless `name` is given (a runtime API load names it).
    `complete`: the files are final (a download of whole objects, a folder a runtime API call
    names), so what looks half-copied is invalid, and the reason says what is wrong rather
    than that the folder is looked at again."""
    listing = _listing or list_folder(str(path))
    base: dict[str, Any] = {"name": display_name(name or path.name), "path": path,
            "fingerprint": listing.fingerprint, "size": listing.size}
    try:
        return _inspect(path, listing, base, limit=limit, served_name=served_name,
                        name=name or path.name, complete=complete)
    except Exception as exc:  # whatever the folder holds, the scan goes on
        return AdapterFolder(**base, problem=f"folder cannot be read ({type(exc).__name__}: "
                                             f"{_shown(str(exc))})")


def _unfinished(base: dict[str, Any], complete: bool, copying: str, final: str,
                **described: Any) -> AdapterFolder:
    """A folder that looks half-copied: pending (`copying` says why) while it may still be
    written, invalid (`final`) when its files are known to be final."""
    return AdapterFolder(**{**base, **described}, pending=not complete,
                         problem=final if complete else copying)


def _inspect(path: Path, listing: _Listing, base: dict[str, Any], *, limit: RankLimit | None,
             served_name: str | None, name: str, complete: bool) -> AdapterFolder:
    folder = str(path)
    files = listing.files
    if listing.error is not None:
        return _unfinished(base, complete, f"folder cannot be listed ({listing.error}); "
                           "looking again", f"folder cannot be listed ({listing.error})")
    what = "folder name" if name == path.name else f"adapter name '{display_name(name)}'"
    if (problem := name_problem(name)) is not None:
        return AdapterFolder(**base, problem=f"{what} {problem}")
    if served_name and name == served_name:
        return AdapterFolder(
            **base, problem=f"{what} equals the served model name; "
            + ("rename the folder" if name == path.name else "choose another name"))
    for special in (CONFIG_FILE, *WEIGHT_FILES):
        if special in listing.others:
            return AdapterFolder(**base, problem=f"{special} is not a regular file (a folder, "
                                 "a pipe or a broken link); replace it with the real file")
    unreadable = sorted(f for f in files if not _readable(os.path.join(folder, f))
                        and os.path.lexists(os.path.join(folder, f)))  # (not just vanished)
    if unreadable:
        return AdapterFolder(**base, problem=f"{unreadable[0]} cannot be read by this user "
                             f"(uid {os.geteuid()}); make the adapter's files readable "
                             "(chmod -R a+rX) or run as their owner")
    weights_name = next((w for w in WEIGHT_FILES if w in files), None)
    weights = path / weights_name if weights_name else None
    if CONFIG_FILE not in files:
        if weights is not None or files:
            return _unfinished(base, complete, "incomplete: adapter_config.json not there yet",
                               "no adapter_config.json in the folder", weights=weights)
        if listing.others:
            return AdapterFolder(**base, problem="no adapter files directly in this folder; "
                                 "an adapter's adapter_config.json and weights go directly in "
                                 "NIM_PEFT_SOURCE/<name>/")
        return _unfinished(base, complete, "empty folder", "the folder is empty")
    if files[CONFIG_FILE] > MAX_CONFIG_BYTES:
        return AdapterFolder(**base, problem=f"adapter_config.json is {files[CONFIG_FILE]} bytes;"
                             f" a config over {MAX_CONFIG_BYTES >> 20} MiB is not read")
    try:  # read what the listing saw (a fixed 1 MiB buffer per read costs more than I/O)
        raw = _read_regular(os.path.join(folder, CONFIG_FILE), files[CONFIG_FILE] + 1)
        config = json.loads(raw) if raw.strip() else None
    except FileNotFoundError:
        return _unfinished(base, complete, "files changing; looking again",
                           "adapter_config.json went while it was read")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        config = None
    if config is None:
        if not complete and _recently_written(path / CONFIG_FILE):
            return AdapterFolder(**base, pending=True,
                                 problem="incomplete: adapter_config.json still being written")
        return AdapterFolder(**base, problem="adapter_config.json is not valid JSON")
    if not isinstance(config, dict):
        return AdapterFolder(**base, problem="adapter_config.json is not a JSON object")
    rank = config.get("r")
    alpha = config.get("lora_alpha")
    described: dict[str, Any] = {
        **base,
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        "alpha": alpha if isinstance(alpha, int | float) and not isinstance(alpha, bool) else None,
        "target_modules": _target_modules(config.get("target_modules")) or (),
        "weights": weights,
        "config": config,
    }
    problem = config_problem(config, limit=limit)
    if problem is None and weights is None:
        return _unfinished(described, complete, "incomplete: no adapter_model.safetensors yet",
                           "no adapter_model.safetensors (or .bin) in the folder")
    if problem is None and weights is not None:
        if weights_name == WEIGHT_FILES[0]:
            uniform = described["rank"] if not config.get("rank_pattern") else None
            problem = safetensors_problem(os.path.join(folder, weights_name), files[weights_name],
                                          rank=uniform)
        else:
            problem = zip_problem(weights)
        if problem and problem.startswith("incomplete"):
            return _unfinished(described, complete, problem, problem.replace(
                "incomplete: ", "").replace("still being written", "is truncated or malformed"))
    return AdapterFolder(**described, problem=problem)


def scan_source(
    source: Path, *, limit: RankLimit | None = None, served_name: str | None = None
) -> list[AdapterFolder]:
    """Every adapter folder directly under `source` (hidden ones skipped), sorted by name.

    Without `limit` no rank is refused (the start-up scan, before the limit is known)."""
    return AdapterScanner(source, limit=limit, served_name=served_name).scan()


class AdapterScanner:
    """Scans a source folder again and again; re-reads a folder only when its fingerprint moves.

    A pass over unchanged folders costs one `scandir` per folder and one `stat` per file. Results
    are kept only for folders that still exist, so memory follows the folder, not its history.
    Never raises: a missing or unreadable source is `source_problem`, not an empty folder.
    """

    def __init__(
        self, source: Path, *, limit: RankLimit | None = None, served_name: str | None = None
    ) -> None:
        self.source = source
        self.limit = limit
        self.served_name = served_name
        self._known: dict[str, AdapterFolder] = {}
        #: why the last scan could not list the source (None: it could)
        self.source_problem: str | None = None

    #: what the service does while `source_problem` lasts (it logs this once)
    retry_hint = "looking again every pass (check the volume mount)"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where this scanner's adapter files live (what a snapshot may read)."""
        return (Path(os.path.realpath(self.source)),)

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
                entries = [e for e in it if not e.name.startswith(".") and is_folder(e)]
            self.source_problem = None
        except OSError as exc:
            self.source_problem = (f"cannot be read ({exc.strerror or type(exc).__name__})"
                                   if not isinstance(exc, FileNotFoundError) else "is gone")
            return list(self._known.values())
        real_source: str | None = None
        known: dict[str, AdapterFolder] = {}
        for entry in sorted(entries, key=lambda e: e.name):
            listing = list_folder(entry.path)
            old = self._known.get(entry.name)
            if old is not None and old.fingerprint == listing.fingerprint and not old.pending:
                known[entry.name] = old
                continue
            if entry.is_symlink():
                real_source = real_source or os.path.realpath(self.source)
                if _outside(entry.path, real_source):
                    known[entry.name] = AdapterFolder(
                        name=display_name(entry.name), path=Path(entry.path),
                        fingerprint=listing.fingerprint, size=listing.size,
                        problem="is a link that leads outside NIM_PEFT_SOURCE; copy the "
                        "adapter into the folder instead")
                    continue
            folder = inspect_folder(Path(entry.path), limit=self.limit,
                                    served_name=self.served_name, _listing=listing)
            if folder.valid and listing.links:
                real_source = real_source or os.path.realpath(self.source)
                out = outside_roots(entry.path, (Path(real_source),), "NIM_PEFT_SOURCE")
                if out is not None:
                    folder = replace(folder, problem=f"{out}; copy the file itself instead")
            known[entry.name] = folder
        self._known = known
        return list(known.values())


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


def _outside(path: str, real_source: str) -> bool:
    """The link `path` leads outside `real_source` (or cannot be followed)."""
    target = resolved(path)
    return target is None or not target.startswith(real_source.rstrip("/") + "/")
