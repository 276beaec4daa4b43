"""The runtime adapter API: loads and unloads asked for on the public port.

NIM documents two ways to manage adapters in dynamic mode, the folder and runtime API calls, and
fleet controllers (AIBrix) call vLLM's `POST /v1/load_lora_adapter`. Here a call only records
intent (`Intent`, kept under NIM_CACHE_PATH) and asks the reconciler to carry it out, so an API
adapter goes through the same validation, snapshots, states and reasons as a folder adapter, and
the call answers with the outcome. Paths are confined to NIM_PEFT_SOURCE and
NIM_PEFT_API_ALLOWED_PATHS. `gateway.api_routes` turns `Answer`s into vLLM's or SGLang's bodies
(their wording is in `entrypoint.backends`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path

from entrypoint.adapters.files import Kind, list_folder
from entrypoint.adapters.folder import AdapterFolder, Origin, inspect_folder
from entrypoint.adapters.names import display_name, name_problem, outside_roots
from entrypoint.adapters.rank import RankLimit
from entrypoint.adapters.uris import is_remote, uri_problem
from entrypoint.reconcile.reconciler import Reconciler
from entrypoint.reconcile.registry import AdapterRecord, Registry, State
from entrypoint.sources.intent import Location
from entrypoint.sources.remote import FILE_SCHEME, parse_uri

log = logging.getLogger(__name__)

WAITING = (Kind.DOWNLOADING, Kind.UPLOADING)  # a URI's adapter on its way
DOWNLOAD_WAIT_SECS = 1.0  # the longest wait between passes while a URI's adapter comes


def shown(where: Location) -> str:
    return display_name(str(where))


class Problem(enum.Enum):
    """A failure that a form of the API (SGLang's) words its own way."""

    ALREADY_LOADED = "already_loaded"  # the name is served already


@dataclass(frozen=True)
class Answer:
    """The outcome of one API call: `status` 200 with `ok`, else an error and its type."""

    ok: bool
    status: int
    message: str
    kind: str = ""
    problem: Problem | None = None

    @classmethod
    def error(cls, status: int, message: str, problem: Problem | None = None) -> Answer:
        kinds = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
                 413: "BadRequestError", 500: "InternalServerError",
                 503: "ServiceUnavailableError"}
        return cls(False, status, message, kinds.get(status, "Error"), problem)


def invalid_folder_problem(folder: AdapterFolder, limit: RankLimit | None) -> str | None:
    """Why an adapter folder cannot be loaded through the API, as its answer says it."""
    problem = folder.problem
    if (limit is not None and limit.derived and folder.rank
            and folder.rank <= limit.engine_max and problem == limit.problem(folder.rank)):
        # a failed call is not kept, so a restart alone would not raise the limit
        problem = (f"rank {folder.rank} is above this server's rank limit "
                   f"{limit.value}, derived at start from the adapters present then; "
                   f"set NIM_MAX_LORA_RANK={limit.engine_rank(folder.rank)} and restart "
                   "to serve it")
    return problem


async def folder_refusal(path: Path, roots: tuple[Path, ...]) -> Answer | None:
    """Why the folder `path` may not be loaded (confinement, existence), or None."""
    problem = await asyncio.to_thread(outside_roots, str(path), roots)
    if problem is not None and not roots:  # an s3:// source and no folder listed
        return Answer.error(403, f"lora_path {problem}: none is allowed (NIM_PEFT_SOURCE is "
                            "an object store); list the folders runtime loads may read in "
                            "NIM_PEFT_API_ALLOWED_PATHS.")
    if problem is not None:
        allowed = ", ".join(display_name(str(root)) for root in roots)
        return Answer.error(403, f"lora_path {problem}: {allowed} (NIM_PEFT_SOURCE and "
                            "NIM_PEFT_API_ALLOWED_PATHS); copy the adapter there or add its "
                            "folder to NIM_PEFT_API_ALLOWED_PATHS.")
    if not await asyncio.to_thread(os.path.isdir, path):
        return Answer.error(404, f"No adapter folder at {display_name(str(path))}: it does "
                            "not exist (or is not a folder).")
    return None


def describes(record: AdapterRecord, where: Location) -> bool:
    """The record describes the adapter at `where` (a folder, or a URI's download)."""
    if isinstance(where, Path):
        return record.source == where
    return record.url.startswith(where.rstrip("/"))


class NameLocks:
    """One lock per name, kept only while a call on that name runs or waits."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # per name: lock, its users

    async def run(self, name: str, call: Coroutine[None, None, Answer]) -> Answer:
        """Run `call` while no other call on `name` runs."""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                return await call
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


class AdapterAPI:
    """Runtime loads and unloads, carried out by `reconciler` (None: the API is off, and
    `off` says why)."""

    def __init__(
        self,
        *,
        registry: Registry,
        served_name: str,
        source: Path | None,
        reconciler: Reconciler | None,
        timeout: float,
        off: str | None = None,
        max_adapters: int = 256,
    ) -> None:
        self.registry = registry
        self.max_adapters = max_adapters  # adapters loaded through the API at once
        self.served_name = served_name
        self.source = source
        self.reconciler = reconciler
        self.timeout = timeout
        self.off = off
        self._locks = NameLocks()  # API calls on one name run one at a time

    @property
    def roots(self) -> tuple[Path, ...]:
        return self.reconciler.api_roots if self.reconciler is not None else ()

    def loaded_adapters(self) -> dict[str, str]:
        """Served adapters and the folders they come from (SGLang's `loaded_adapters`)."""
        return {r.name: display_name(str(r.source)) for r in self.registry.records()
                if r.servable and r.source is not None}

    def refusal(self) -> Answer | None:
        if self.reconciler is None:
            return Answer.error(404, f"The runtime adapter API is off: {self.off or 'off'}.")
        return None

    # ---- load ----

    async def load(self, name: object, path: object, *, replace: bool = False,
                   field: str = "lora_path") -> Answer:
        """Load the adapter at `path` (a folder on this server, or an s3:// or hf:// URI
        allowed by NIM_PEFT_API_ALLOWED_PATHS) under `name` (`replace`: a served API adapter
        takes the new weights). `field` names `path` as the caller's form does."""
        if (refused := self.refusal()) is not None:
            return refused
        if not name or not path or not isinstance(name, str) or not isinstance(path, str):
            return Answer.error(400, f"Both 'lora_name' and '{field}' must be provided.")
        if (problem := name_problem(name)) is not None:
            shown = display_name(name if len(name) < 80 else name[:77] + "...")
            return Answer.error(400, f"lora_name {shown!r} {problem}.")
        if name == self.served_name:
            return Answer.error(400, f"The lora adapter '{name}' conflicts with a served base "
                                "model.")
        if any(ord(c) < 32 or c == "\x7f" for c in path) or len(path) > 4096:
            return Answer.error(400, f"{field} contains control characters or is over 4096 "
                                "characters; give the folder of the adapter on this server.")
        path = path[len(FILE_SCHEME):] if path.startswith(FILE_SCHEME) else path
        if is_remote(path):
            return await self._locks.run(name, self._load(name, path, replace=replace))
        if not os.path.isabs(path):
            return Answer.error(400, f"{field} '{display_name(path)}' is not an absolute path; "
                                "give the folder of the adapter on this server, or an s3:// or "
                                "hf:// URI.")
        return await self._locks.run(name, self._load(name, Path(os.path.normpath(path)),
                                                      replace=replace))

    async def _load(self, name: str, where: Location, *, replace: bool) -> Answer:
        assert self.reconciler is not None
        intent = self.reconciler.intent
        refused = await (folder_refusal(where, self.roots) if isinstance(where, Path) else
                         asyncio.to_thread(self._uri_refusal, where))
        if refused is not None:
            return refused
        record = self.registry.get(name)
        own_folder = self.source is not None and (self.source / name).is_dir()
        if name not in intent.loaded and (own_folder or (
                record is not None and record.origin is Origin.FOLDER)):
            return await self._load_own_folder(name, where)
        if record is not None and record.servable and not replace:
            return Answer.error(400, f"The lora adapter '{name}' has already been loaded. If you "
                                "want to load the adapter in place, set 'load_inplace' to True.",
                                Problem.ALREADY_LOADED)
        if (full := self._full(name)) is not None:
            return full
        if isinstance(where, Path) and (invalid := await self._invalid(name, where)):
            return invalid
        if (full := self._full(name)) is not None:  # (loads of other names ran meanwhile)
            return full
        previous = intent.loaded.get(name)
        if (unsaved := self._keep(loaded={name: where})) is not None:
            return unsaved
        try:
            await self._converge(name)
        except Exception:
            await self._revert(name, previous)  # (a pass that failed: nothing is left behind)
            raise
        record = self.registry.get(name)
        if record is not None and record.servable and record.loaded_version == record.version \
                and intent.loaded.get(name) == where and describes(record, where):
            log.info("adapter %s: loaded through the API from %s", name, shown(where))
            return Answer(True, 200, f"Success: LoRA adapter '{name}' added successfully.")
        last = self.reconciler.api.last(name)
        if (record is not None and record.state is State.LOADING) or (
                last is not None and last.kind in WAITING):  # (the timeout came first)
            return Answer.error(503, f"Adapter '{name}' is still loading; GET /v1/adapters/{name} "
                                "shows when it is ready.")
        reason = record.reason if record is not None and record.reason else "not loaded"
        await self._revert(name, previous)  # the call failed: it leaves nothing behind
        transient = record is None or record.state is State.PENDING or (
            last is not None and last.pending)  # (a new download failed; the old one serves)
        return Answer.error(503 if transient else 400,
                            f"Adapter '{name}' was not loaded: {reason}.")

    def _uri_refusal(self, uri: str) -> Answer | None:
        """Why the URI `uri` may not be fetched (not allowed, not an adapter's), or None."""
        assert self.reconciler is not None
        api = self.reconciler.api
        if (problem := uri_problem(uri, api.uris)) is not None:
            return Answer.error(403, f"{display_name(problem)}.")
        if api.remote is None:
            return Answer.error(403, f"{display_name(uri)}: this server fetches no URIs.")
        try:
            parse_uri("check", uri)
        except ValueError as exc:
            return Answer.error(400, f"{display_name(str(exc))}.")
        return None

    async def _invalid(self, name: str, path: Path) -> Answer | None:
        """The refusal of a folder that is not a valid adapter, or None."""
        assert self.reconciler is not None
        folder = await asyncio.to_thread(
            inspect_folder, path, limit=self.reconciler.scanner.limit,
            served_name=self.served_name, name=name, complete=True)
        if folder.valid:
            return None
        problem = invalid_folder_problem(folder, self.reconciler.scanner.limit)
        return Answer.error(400, f"Adapter '{name}' at {display_name(str(path))} cannot be "
                            f"loaded: {problem}.")

    async def _converge(self, name: str) -> None:
        """Passes until the work on `name` is done, and a download it waits for (an adapter
        loaded from a URI) has arrived or failed, up to the API's timeout."""
        assert self.reconciler is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            await self.reconciler.converge(name, timeout=max(0.0, deadline - loop.time()))
            folder = self.reconciler.api.last(name)
            if folder is None or folder.kind not in WAITING or loop.time() >= deadline:
                return
            # the next pass when a download ends (an S3 upload settling ends no download:
            # looked at again each second), not a pass every poll: a pass asks the Hub for
            # every followed entry (found in review)
            await self.reconciler.fetched(min(DOWNLOAD_WAIT_SECS, deadline - loop.time()))

    def _full(self, name: str) -> Answer | None:
        """The refusal of a new name once NIM_PEFT_API_MAX_ADAPTERS are loaded through the API.
        Checked again right before the intent changes: calls for other names run in parallel."""
        assert self.reconciler is not None
        loaded = self.reconciler.intent.loaded
        if name in loaded or len(loaded) < self.max_adapters:
            return None
        return Answer.error(400, f"This server already serves {len(loaded)} adapters loaded "
                            "through the API, its limit (NIM_PEFT_API_MAX_ADAPTERS); unload one "
                            "first, or raise the limit.")

    async def _load_own_folder(self, name: str, path: Location) -> Answer:
        """`name` is a folder under NIM_PEFT_SOURCE: loading it from its own folder undoes an
        API unload; any other path is a conflict."""
        assert self.reconciler is not None
        if self.source is None:  # an s3:// source: its adapters have no folder to name
            return Answer.error(400, f"An adapter named '{name}' comes from NIM_PEFT_SOURCE "
                                "(an object store); choose another lora_name. Unloaded "
                                "through the API, it is served again when its objects change.")
        own = Path(os.path.realpath(self.source / name))
        if not isinstance(path, Path) or Path(os.path.realpath(path)) != own:
            return Answer.error(400, f"An adapter folder named '{name}' is in NIM_PEFT_SOURCE; "
                                "choose another lora_name, or give its own folder as lora_path.")
        intent = self.reconciler.intent
        if name not in intent.unloaded:
            record = self.registry.get(name)
            if record is not None and record.servable:
                return Answer.error(400, f"The lora adapter '{name}' has already been loaded "
                                    "(from its folder in NIM_PEFT_SOURCE).", Problem.ALREADY_LOADED)
        elif (unsaved := self._keep(unloaded={name: None})) is not None:
            return unsaved
        await self.reconciler.converge(name, timeout=self.timeout)
        record = self.registry.get(name)
        if record is not None and record.servable:
            return Answer(True, 200, f"Success: LoRA adapter '{name}' added successfully.")
        reason = record.reason if record is not None and record.reason else "not loaded"
        return Answer.error(400 if record is not None and record.state is State.FAILED else 503,
                            f"Adapter '{name}' was not loaded: {reason}.")

    # ---- unload ----

    async def unload(self, name: object) -> Answer:
        """Unload `name`: an API adapter is forgotten; a folder adapter stays unloaded until its
        folder's files change."""
        if (refused := self.refusal()) is not None:
            return refused
        if not name or not isinstance(name, str):
            return Answer.error(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        return await self._locks.run(name, self._unload(name))

    async def _unload(self, name: str) -> Answer:
        assert self.reconciler is not None
        intent = self.reconciler.intent
        record = self.registry.get(name)
        own = self.source / name if self.source is not None else None
        if name in intent.loaded:
            # A folder of that name (added after the API load) must not take its place.
            hide = list_folder(str(own)).fingerprint if own is not None and own.is_dir() else None
        elif record is not None and record.origin is Origin.FOLDER and (
                record.servable or record.state is State.REMOVING):
            hide = record.version
        else:
            return Answer.error(404, f"The lora adapter '{name}' cannot be found.")
        if (unsaved := self._keep(loaded={name: None}, unloaded={name: hide} if hide else {})
                ) is not None:
            return unsaved
        await self.reconciler.converge(name, timeout=self.timeout)
        record = self.registry.get(name)
        if record is None or record.state is State.UNLOADED:
            log.info("adapter %s: unloaded through the API", name)
            return Answer(True, 200, f"Success: LoRA adapter '{name}' removed successfully.")
        return Answer.error(503, f"Adapter '{name}' is being removed ({record.reason}); the "
                            "unload is retried.")

    # ---- helpers ----

    def _keep(self, *, loaded: dict[str, Location | None] | None = None,
              unloaded: dict[str, str | None] | None = None) -> Answer | None:
        """Change the intent; when it cannot be written, it stays as it was and the answer says
        why (a decision a restart would not remember is not taken)."""
        assert self.reconciler is not None
        try:
            self.reconciler.intent.change(loaded=loaded, unloaded=unloaded)
            return None
        except OSError as exc:
            return Answer.error(500, f"Cannot write {self.reconciler.intent.file} under "
                                f"NIM_CACHE_PATH ({exc.strerror or exc}); make it writable.")

    async def _revert(self, name: str, previous: Location | None) -> None:
        """Undo a load that failed: the previous folder (or none) again, acted on."""
        assert self.reconciler is not None
        self.reconciler.intent.change_or_warn(loaded={name: previous})
        await self.reconciler.converge(name, timeout=self.timeout)  # nothing of it stays
