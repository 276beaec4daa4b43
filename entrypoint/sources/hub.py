"""Adapters on the Hugging Face Hub (or a mirror of it): `hf://ORG/REPO`, at a branch, a tag
or a commit.

One record per adapter: the revision it follows, the commit that revision pointed at when last
asked, the download under way and how its last tries failed. Each pass asks the Hub which commit
a branch points at (one small call per adapter; none for a pinned commit); a new commit is
downloaded beside the passes (only the adapter's own files) into a folder named after it, then
judged like any folder. Honours HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE (huggingface_hub reads
them). Must not decide what is served or talk to a backend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from entrypoint.adapters.files import CONFIG_FILE, WEIGHT_FILES, Kind
from entrypoint.adapters.folder import (
    AdapterFolder,
    config_refuses,
    fetched_whole,
    inspect_folder,
)
from entrypoint.adapters.rank import RankLimit
from entrypoint.backoff import STORE_CALLS, Backoff
from entrypoint.clock import REAL, Clock
from entrypoint.fetches import FETCHES, FetchLog, bytes_under

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
COMMIT = re.compile(r"[0-9a-f]{40}")
DOWNLOADERS = 4


class HubError(ValueError):
    """An hf:// URI that cannot name a repository."""


@dataclass(frozen=True)
class HubRepo:
    """`hf://ORG/REPO` and the revision followed (a branch, a tag, or a pinned commit)."""

    repo: str
    revision: str = "main"

    @classmethod
    def parse(cls, uri: str, revision: str | None = None) -> HubRepo:
        if not uri.startswith(HF_SCHEME):
            raise HubError(f"{uri!r} is not an hf:// URI")
        repo = uri[len(HF_SCHEME):].strip("/")
        if not REPO.fullmatch(repo) or ".." in repo:
            raise HubError(f"{uri!r} does not name a repository; write hf://ORG/REPO")
        return cls(repo, revision or "main")

    @property
    def uri(self) -> str:
        return f"{HF_SCHEME}{self.repo}"

    @property
    def pinned(self) -> bool:
        return COMMIT.fullmatch(self.revision) is not None


@dataclass
class _Fetch:
    """What is known of one Hub adapter."""

    repo: HubRepo
    commit: str = ""  # the commit its revision pointed at when last asked
    future: concurrent.futures.Future[AdapterFolder] | None = None
    folder: AdapterFolder | None = None  # the last download judged
    failures: int = 0
    retry_at: float = 0.0
    reason: str = ""
    reported: str = ""


def explain(exc: BaseException, repo: HubRepo) -> str:
    """One line for a failed Hub call, naming what to check."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return f"{repo.uri} is gated; accept its terms on the Hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{repo.uri} was not found at {constants.ENDPOINT} (or it is private: set "
                "HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo.uri} has no revision {repo.revision!r}"
    if isinstance(exc, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        return (f"{repo.uri} is not in the local cache and HF_HUB_OFFLINE is set; unset it or "
                "fill the cache")
    return (f"the Hub at {constants.ENDPOINT} did not answer for {repo.uri} "
            f"({type(exc).__name__}); check HF_ENDPOINT and the network")


class HubDownloads:
    """The Hub adapters of one source, downloaded under `folder`."""

    def __init__(self, folder: Path, *, limit: RankLimit | None, served_name: str | None,
                 backoff: Backoff = STORE_CALLS, clock: Clock = REAL, api: Any = None,
                 fetches: FetchLog | None = None) -> None:
        self.folder, self.limit, self.served_name = folder, limit, served_name
        self.backoff, self.clock = backoff, clock
        self.fetches = fetches if fetches is not None else FETCHES
        self._api = api
        self._records: dict[str, _Fetch] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(DOWNLOADERS,
                                                           thread_name_prefix="hf-download")
        self._partials: set[str] = set()  # the folders fetches are writing now
        self._lock = threading.Lock()
        self.revision_calls = 0
        self.on_done: Callable[[], None] | None = None

    @property
    def api(self) -> Any:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi()
        return self._api

    def folder_of(self, name: str, repo: HubRepo) -> AdapterFolder:
        """Adapter `name` from `repo` as this pass sees it: its download when it is the
        revision's current commit, else pending while that commit is fetched."""
        record = self._records.get(name)
        if record is None or record.repo != repo:
            record = self._records[name] = _Fetch(repo)
        if record.future is not None:
            return self._collect(name, record)
        if record.failures and self.clock.now() < record.retry_at:
            return self._pending(name, record, record.reason, Kind.DOWNLOAD_FAILED)
        try:
            commit = repo.revision if repo.pinned else self._head(repo)
        except Exception as exc:  # noqa: BLE001 - one adapter's failure is its own reason
            return self._failed(name, record, exc)
        if record.folder is not None and commit == record.commit:
            return record.folder  # unchanged: one small call, nothing fetched
        record.commit = commit
        record.future = self._pool.submit(self._fetch, name, repo, commit)
        record.future.add_done_callback(self._done)
        return self._pending(name, record, f"downloading {repo.uri} at {commit[:12]}",
                             Kind.DOWNLOADING)

    def forget(self, names: set[str]) -> None:
        for name in names:
            self._records.pop(name, None)

    def names(self) -> set[str]:
        return set(self._records)

    def wait(self, timeout: float | None = None) -> bool:
        futures = [r.future for r in self._records.values() if r.future is not None]
        concurrent.futures.wait(futures, timeout=timeout)
        return bool(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def collect(self) -> None:
        """Delete downloads no adapter is at any more (an older commit, a removed entry); a
        download under way is kept (deleting it mid-way failed it: found by the API's tests,
        whose passes come every 0.1 s while a load waits)."""
        keep = {f"{name}-{r.commit}" for name, r in self._records.items() if r.commit}
        with self._lock:  # (also those of fetches whose record was forgotten)
            keep |= self._partials
        for entry in self.folder.glob("*") if self.folder.is_dir() else ():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _head(self, repo: HubRepo) -> str:
        """The commit `repo`'s revision points at now (one small call to the Hub)."""
        self.revision_calls += 1
        return str(self.api.model_info(repo.repo, revision=repo.revision).sha)

    def _collect(self, name: str, record: _Fetch) -> AdapterFolder:
        assert record.future is not None
        if not record.future.done():
            return self._pending(name, record, f"downloading {record.repo.uri} at "
                                 f"{record.commit[:12]}", Kind.DOWNLOADING)
        future, record.future = record.future, None
        try:
            folder = future.result()
        except Exception as exc:  # noqa: BLE001
            return self._failed(name, record, exc)
        record.folder, record.failures, record.reason, record.reported = folder, 0, "", ""
        return folder

    def _fetch(self, name: str, repo: HubRepo, commit: str) -> AdapterFolder:
        """Download the adapter's own files at `commit` (once per commit) and judge them."""
        target = self.folder / f"{name}-{commit}"
        if not fetched_whole(target, limit=self.limit):
            self._download(name, repo, commit, target)
        folder = inspect_folder(target, limit=self.limit, served_name=self.served_name,
                                name=name, complete=True)
        return replace(folder, fingerprint=commit, local_fingerprint=folder.fingerprint,
                       url=f"{repo.uri}@{commit[:12]}", private=True)

    def _download(self, name: str, repo: HubRepo, commit: str, target: Path) -> None:
        """The config, then (unless it rules the adapter out: the folder keeps the config
        alone, and its reason shows) the weights, into a folder of its own (two fetches of one
        commit, a retry while an abandoned one still runs, never write into each other's),
        moved to `target` when whole."""
        from huggingface_hub import snapshot_download

        self.folder.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.folder))
        with self._lock:
            self._partials.add(partial.name)
        fetch = self.fetches.begin(name, f"{repo.uri}@{commit[:12]}", self._size(repo, commit),
                                   measure=lambda: bytes_under(partial))
        ok = False
        try:
            snapshot_download(repo.repo, revision=commit, local_dir=partial,
                              allow_patterns=[CONFIG_FILE])
            if not config_refuses(partial / CONFIG_FILE, limit=self.limit):
                snapshot_download(repo.repo, revision=commit, local_dir=partial,
                                  allow_patterns=list(WEIGHT_FILES))
            shutil.rmtree(partial / ".cache", ignore_errors=True)  # (the client's own)
            fetch.counted(bytes_under(partial))
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            ok = True
        finally:
            self.fetches.end(fetch, ok=ok)
            with self._lock:
                self._partials.discard(partial.name)
            shutil.rmtree(partial, ignore_errors=True)

    def _size(self, repo: HubRepo, commit: str) -> int:
        """The bytes of the adapter's files at `commit` (0 when the Hub does not say)."""
        try:
            infos = self.api.get_paths_info(repo.repo, [CONFIG_FILE, *WEIGHT_FILES],
                                            revision=commit)
            return sum(int(getattr(info, "size", 0) or 0) for info in infos)
        except Exception:  # noqa: BLE001 - progress is shown without its total then
            return 0

    def _done(self, future: concurrent.futures.Future[AdapterFolder]) -> None:
        if self.on_done is not None and not future.cancelled():
            self.on_done()

    def _failed(self, name: str, record: _Fetch, exc: BaseException) -> AdapterFolder:
        problem = explain(exc, record.repo)
        record.failures += 1
        record.retry_at = self.clock.now() + self.backoff.delay(record.failures)
        record.reason = f"{problem}; retrying with backoff"
        if record.reported != problem:
            record.reported = problem
            log.warning("adapter %s: %s; retrying with backoff", name, problem)
        if record.folder is not None:  # the version downloaded before serves on
            return record.folder
        return self._pending(name, record, record.reason, Kind.DOWNLOAD_FAILED)

    def _pending(self, name: str, record: _Fetch, reason: str, kind: Kind) -> AdapterFolder:
        if record.folder is not None and kind is Kind.DOWNLOADING:
            return record.folder  # the previous commit serves until the new one is here
        return AdapterFolder(name=name, path=self.folder / name, fingerprint=f"hf:{name}",
                             pending=True, problem=reason, kind=kind, url=record.repo.uri)
