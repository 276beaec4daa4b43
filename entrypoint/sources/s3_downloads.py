"""Downloads of an S3 source's complete adapters, beside the passes.

One record per adapter says which version is wanted, the download under way and how its last
tries failed. A download runs in a thread of its own (a large adapter never holds up the
others), fetches each object with `If-Match` on its listed ETag into `<folder>/.tmp-*` and
renames it into place, then inspects it like a folder. Must not decide when an adapter is
complete (the source does) or talk to a backend.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
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
from entrypoint.fetches import FETCHES, Fetch, FetchLog
from entrypoint.sources.s3_client import ADAPTER_FILES, Listed, S3Url, explain

log = logging.getLogger(__name__)

DOWNLOADERS = 8
CHUNK = 1 << 20

Future = concurrent.futures.Future[AdapterFolder]


class _Changed(Exception):
    """The objects changed between the listing and the download."""


class _Unwanted(Exception):
    """The download is no longer wanted (its prefix went, a newer version came, stopping)."""


@dataclass
class _Download:
    """What is known of one adapter's downloads."""

    version: str  # the version wanted: a download of another one stops at its next chunk
    future: Future | None = None  # the download of `version` under way (or done, not taken)
    failures: int = 0  # tries of `version` that failed in a row
    retry_at: float = 0.0  # (monotonic) not tried again before
    reason: str = ""  # why the last try failed, as shown on the adapter
    reported: str = ""  # the last failure logged (once per problem, not once per pass)


class Downloads:
    """The downloads of one S3 source into `folder`."""

    def __init__(self, source: S3Url, client: Any, endpoint: str, folder: Path, *,
                 limit: RankLimit | None, served_name: str | None,
                 backoff: Backoff = STORE_CALLS, clock: Clock = REAL,
                 fetches: FetchLog | None = None) -> None:
        self.source, self.client, self.endpoint, self.folder = source, client, endpoint, folder
        self.limit, self.served_name = limit, served_name
        self.backoff, self.clock = backoff, clock
        self.fetches = fetches if fetches is not None else FETCHES
        self._records: dict[str, _Download] = {}
        self._queue: list[tuple[int, AdapterFolder, Listed, _Download]] = []
        self._running: set[Future] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(DOWNLOADERS,
                                                           thread_name_prefix="s3-download")
        self._closed = threading.Event()
        #: called (from a download's thread) when a usable download ends
        self.on_done: Callable[[], None] | None = None

    def folder_of(self, base: AdapterFolder, listed: Listed) -> AdapterFolder:
        """A complete adapter: its download when done, else pending while it is (queued now
        when it is not under way; `start` starts what was queued)."""
        name = base.name
        record = self._records.get(name)
        if record is not None and record.version == listed.fingerprint and record.future:
            if not record.future.done():
                return self._pending(base, record)
            future, record.future = record.future, None
            try:
                return future.result()
            except Exception as exc:  # noqa: BLE001 - (_fetch catches its own; never a crash)
                return replace(base, pending=True, kind=Kind.DOWNLOAD_FAILED,
                               problem=f"download failed ({exc!r}); looking again")
        if record is None or record.version != listed.fingerprint:
            record = self._records[name] = _Download(listed.fingerprint)
        if fetched_whole(self.folder / f"{name}-{listed.fingerprint}", limit=self.limit):
            return self._fetch(base, listed, record)  # downloaded before: inspected at once
        if record.failures and self.clock.now() < record.retry_at:
            return replace(base, pending=True, problem=record.reason,  # backing off
                           kind=Kind.DOWNLOAD_FAILED)
        size = sum(o.size for k, o in listed.objects.items() if k in ADAPTER_FILES)
        self._queue.append((size, base, listed, record))
        return self._pending(base, record)

    def start(self) -> None:
        """Start the downloads this pass queued, smallest first (a small adapter is not queued
        behind large ones found in the same pass)."""
        for _, base, listed, record in sorted(self._queue, key=lambda job: job[0]):
            future = self._pool.submit(self._fetch, base, listed, record)
            record.future = future
            self._running.add(future)
            future.add_done_callback(self._done)
        self._queue = []

    def names(self) -> set[str]:
        return set(self._records)

    def forget(self, names: Iterable[str]) -> None:
        """These adapters went from the store: their downloads stop, their results are not
        wanted."""
        for name in names:
            self._records.pop(name, None)

    def next_retry(self) -> float | None:
        """Seconds until the first failed download may be tried again (None: none failed)."""
        due = [r.retry_at for r in self._records.values() if r.failures]
        return max(0.0, min(due) - self.clock.now()) if due else None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the downloads under way; True when there were any."""
        futures = [r.future for r in self._records.values() if r.future is not None]
        concurrent.futures.wait(futures, timeout=timeout)
        return bool(futures)

    def close(self) -> None:
        """Stop downloading (a download under way ends at its next chunk)."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def collect(self, keep: set[str]) -> None:
        """Delete downloads whose folder names are not in `keep` (a new version, a removed
        prefix) or under way, and unfinished ones left by a crash. Snapshots are copies: nothing
        served reads these."""
        keep = keep | {f"{name}-{r.version}" for name, r in self._records.items() if r.future}
        busy = bool(self._running)  # (superseded downloads too: their .tmp-* is theirs)
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            if entry.name not in keep and not (busy and entry.name.startswith(".tmp-")):
                shutil.rmtree(entry.path, ignore_errors=True)

    @staticmethod
    def _pending(base: AdapterFolder, record: _Download) -> AdapterFolder:
        """`base` while its download runs: a retry keeps its failure's reason."""
        if record.failures:
            return replace(base, pending=True, problem=record.reason, kind=Kind.DOWNLOAD_FAILED)
        return replace(base, pending=True, problem=f"downloading from {base.url}",
                       kind=Kind.DOWNLOADING)

    def _done(self, future: Future) -> None:
        """A download ended: a pass takes its result now when it is usable (a failed one is
        tried again after its backoff, at a pass that comes anyway)."""
        self._running.discard(future)
        usable = not future.cancelled() and future.exception() is None and not (
            future.result().pending)
        if usable and self.on_done is not None and not self._closed.is_set():
            self.on_done()

    def _wanted(self, name: str, record: _Download) -> bool:
        return self._records.get(name) is record

    def _fetch(self, base: AdapterFolder, listed: Listed, record: _Download) -> AdapterFolder:
        """Download a complete adapter (once per version) and inspect it like a folder."""
        name = base.name
        target = self.folder / f"{name}-{listed.fingerprint}"
        try:
            if not fetched_whole(target, limit=self.limit):
                self._download(name, base.url, listed, target, record)
        except _Changed as exc:
            return replace(base, pending=True, problem=f"uploading: {exc}; looking again",
                           kind=Kind.UPLOADING)
        except _Unwanted:
            return replace(base, pending=True, problem="download called off; looking again",
                           kind=Kind.DOWNLOADING)
        except Exception as exc:  # noqa: BLE001 - one adapter's failure is its own reason
            return replace(base, pending=True, problem=self._failed(base, record, exc),
                           kind=Kind.DOWNLOAD_FAILED)
        record.failures, record.retry_at, record.reason, record.reported = 0, 0.0, "", ""
        folder = inspect_folder(target, limit=self.limit, served_name=self.served_name,
                                name=name, complete=True)
        return replace(folder, fingerprint=listed.fingerprint,
                       local_fingerprint=folder.fingerprint, url=base.url, private=True)

    def _failed(self, base: AdapterFolder, record: _Download, exc: Exception) -> str:
        """Note a failed try on `record` (logged once per problem); the reason to show."""
        problem, _ = explain(exc, self.source, self.endpoint) if not isinstance(
            exc, OSError) else (f"cannot be written under NIM_CACHE_PATH ({exc})", False)
        record.failures += 1
        record.retry_at = self.clock.now() + self.backoff.delay(record.failures)
        record.reason = f"download failed: {problem}; retrying with backoff"
        if record.reported != problem:
            record.reported = problem
            log.warning("adapter %s: download from %s failed: %s; retrying with backoff",
                        base.name, base.url, problem)
        return record.reason

    def _download(self, name: str, url: str, listed: Listed, target: Path,
                  record: _Download) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.folder / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        weights = next(w for w in WEIGHT_FILES if w in listed.objects)
        fetch = self.fetches.begin(name, url, sum(listed.objects[k].size
                                                  for k in (CONFIG_FILE, weights)))
        ok = False
        try:
            self._get(name, CONFIG_FILE, listed, temporary / CONFIG_FILE, record, fetch)
            if not config_refuses(temporary / CONFIG_FILE, limit=self.limit):
                self._get(name, weights, listed, temporary / weights, record, fetch)
            # (else the config alone is kept: its reason shows, its weights are never fetched)
            if target.is_dir() and not fetched_whole(target, limit=self.limit):
                shutil.rmtree(target)  # a config kept while a lower rank limit refused it
            try:
                temporary.rename(target)
            except OSError:
                if not target.is_dir():  # (else: the same version, downloaded by another)
                    raise
            ok = True
        finally:
            self.fetches.end(fetch, ok=ok)
            shutil.rmtree(temporary, ignore_errors=True)

    def _get(self, name: str, key: str, listed: Listed, path: Path, record: _Download,
             fetch: Fetch) -> None:
        """One object, as listed, to `path` (never its old and new versions mixed)."""
        from botocore.exceptions import ClientError

        expected = listed.objects[key]
        try:
            answer = self.client.get_object(
                Bucket=self.source.bucket, Key=f"{self.source.prefix}{name}/{key}",
                IfMatch=expected.etag)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "NoSuchKey", "412", "404"):
                raise _Changed(f"{key} changed or went during the download") from None
            raise
        with path.open("wb") as out:
            body = answer["Body"]
            while chunk := body.read(CHUNK):
                if self._closed.is_set() or not self._wanted(name, record):
                    raise _Unwanted()
                out.write(chunk)
                fetch.add(len(chunk))
        if path.stat().st_size != expected.size or (
                answer.get("ETag") and answer["ETag"] != expected.etag):
            raise _Changed(f"{key} changed during the download")
        os.utime(path, (expected.modified, expected.modified))
