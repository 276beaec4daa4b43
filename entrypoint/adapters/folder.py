"""One adapter folder judged, as plain data: an `AdapterFolder` (name, rank, target modules,
fingerprint, problem) from its files.

Reads files only; never talks to a backend, never decides what is served.
"""

from __future__ import annotations

import enum
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from entrypoint.adapters.files import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHT_FILES,
    Kind,
    Listing,
    list_folder,
    read_regular,
    readable,
    safetensors_problem,
    zip_problem,
)
from entrypoint.adapters.names import display_name, name_problem
from entrypoint.adapters.rank import RankLimit

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
    #: what kind of problem `problem` is (code branches on this, never on the text)
    kind: Kind = Kind.INVALID
    #: the fingerprint of the files at `path` when `fingerprint` names another thing (an s3://
    #: adapter's is its objects' keys, sizes and ETags; its download is checked by this one)
    local_fingerprint: str = ""
    #: its files are ours (a download): written once into a new folder and never changed in
    #: place, so a snapshot may hard-link them instead of copying (no second copy on disk)
    private: bool = False

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






def config_refuses(path: Path, *, limit: RankLimit | None) -> bool:
    """Whether the config file at `path` alone rules its adapter out (missing, not a JSON
    object, or a problem `config_problem` names): a fetch then stops before the weights, and
    `inspect_folder` of the folder says why."""
    try:
        config = json.loads(read_regular(str(path), MAX_CONFIG_BYTES + 1))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return True
    return not isinstance(config, dict) or config_problem(config, limit=limit) is not None


def fetched_whole(folder: Path, *, limit: RankLimit | None) -> bool:
    """A download folder holds all a fetch keeps: the config and the weights, or a config that
    rules the adapter out under `limit` (one kept while a lower limit refused it is fetched
    whole once the limit allows it)."""
    if not (folder / CONFIG_FILE).is_file():
        return False
    return any((folder / weights).is_file() for weights in WEIGHT_FILES) or config_refuses(
        folder / CONFIG_FILE, limit=limit)


def inspect_folder(
    path: Path,
    *,
    limit: RankLimit | None = None,
    served_name: str | None = None,
    name: str | None = None,
    complete: bool = False,
    _listing: Listing | None = None,
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
                         problem=final if complete else copying,
                         kind=Kind.INVALID if complete else Kind.UNFINISHED)


def _inspect(path: Path, listing: Listing, base: dict[str, Any], *, limit: RankLimit | None,
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
    unreadable = sorted(f for f in files if not readable(os.path.join(folder, f))
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
        raw = read_regular(os.path.join(folder, CONFIG_FILE), files[CONFIG_FILE] + 1)
        config = json.loads(raw) if raw.strip() else None
    except FileNotFoundError:
        return _unfinished(base, complete, "files changing; looking again",
                           "adapter_config.json went while it was read")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        config = None
    if config is None:
        if not complete and _recently_written(path / CONFIG_FILE):
            return AdapterFolder(**base, pending=True, kind=Kind.UNFINISHED,
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
    if problem is not None:
        return AdapterFolder(**described, problem=problem)
    if weights is None:
        return _unfinished(described, complete, "incomplete: no adapter_model.safetensors yet",
                           "no adapter_model.safetensors (or .bin) in the folder")
    if weights_name == WEIGHT_FILES[0]:
        uniform = described["rank"] if not config.get("rank_pattern") else None
        found = safetensors_problem(os.path.join(folder, weights_name), files[weights_name],
                                    rank=uniform)
    else:
        found = zip_problem(weights)
    if found is not None and found.kind is Kind.UNFINISHED:
        return _unfinished(described, complete, found.text,
                           "weights file is truncated or malformed")
    return AdapterFolder(**described, problem=found.text if found else None)














