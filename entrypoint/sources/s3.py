"""Adapters from an S3-compatible object store: `NIM_PEFT_SOURCE=s3://BUCKET/PREFIX`.

Each immediate sub-prefix `PREFIX/NAME/` is one adapter, named and validated like a folder. A
pass lists the prefix (one call per 1,000 keys) and fingerprints each adapter by its keys, sizes
and ETags, so an unchanged store costs the listing and nothing else. An adapter is downloaded
only once it is complete (its config and weights listed, and its objects unchanged across two
listings, or older than `SETTLE_SECS` by the store's clock, or the config changed last), into
`<downloads>/.tmp-*` and renamed into place; from there it goes through the same validation,
snapshot and load as a folder. Objects are fetched with `If-Match` on the listed ETag, so a
download never mixes an object's old and new versions.

A failed listing is `source_problem` (never an empty store: nothing is unloaded for it), retried
with backoff. Credentials, region and endpoint come from the standard AWS chain (boto3).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from entrypoint.adapters.files import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHT_FILES, Kind
from entrypoint.adapters.folder import AdapterFolder, fetched_whole
from entrypoint.adapters.names import display_name, name_problem
from entrypoint.adapters.rank import RankLimit
from entrypoint.backoff import STORE_CALLS, Backoff
from entrypoint.clock import REAL, Clock
from entrypoint.sources.s3_client import (
    ADAPTER_FILES,
    Listed,
    NotS3,
    S3Url,
    StoredObject,
    adapter_file,
    adapter_fingerprint,
    explain,
    make_client,
    server_time,
    weights_of,
)
from entrypoint.sources.s3_downloads import Downloads

log = logging.getLogger(__name__)

#: objects unchanged this long (two listings apart, or by the store's clock) are complete
SETTLE_SECS = 1.0
FIRST_SETTLE_MAX_SECS = 5.0  # the longest start-up waits for an upload caught in progress


@dataclass(frozen=True)
class _Seen:
    """One adapter as the last listing showed it, and how it was judged."""

    listed: Listed
    folder: AdapterFolder


class S3Source:
    """Lists an S3 prefix again and again and describes each adapter under it as an
    `AdapterFolder` whose files are a local, complete download (the same interface as the
    folder source). Never raises from `scan`: a failed listing is `source_problem`."""

    def __init__(self, source: S3Url, *, downloads: Path, limit: RankLimit | None = None,
                 served_name: str | None = None, client: Any = None,
                 settle: float = SETTLE_SECS, clock: Clock = REAL,
                 backoff: Backoff = STORE_CALLS) -> None:
        self.source = source
        #: how long an adapter's objects must stay unchanged (the refresh interval in `serve`:
        #: two consecutive listings)
        self.settle = max(SETTLE_SECS, settle)
        self.downloads = downloads
        self.limit = limit
        self.served_name = served_name
        self.client = client if client is not None else make_client()
        self.endpoint = str(getattr(self.client.meta, "endpoint_url", "") or "AWS S3")
        self.clock, self.backoff = clock, backoff
        self._seen: dict[str, _Seen] = {}
        self._only = ""  # list this one adapter's prefix only (`single_adapter`)
        #: why the last listing failed (None: it worked); `fatal`: a setting, not an outage
        self.source_problem: str | None = None
        self.fatal = False
        self.failures = 0
        self._next_try = 0.0
        self.list_calls = 0
        # Downloads run beside the passes: an adapter is pending ("downloading") until its
        # download is done, then the next pass takes it.
        self.fetches = Downloads(source, self.client, self.endpoint, downloads, limit=limit,
                                 served_name=served_name, backoff=backoff, clock=clock)
        #: what the service does while `source_problem` lasts (it logs this once)
        self.retry_hint = f"retrying with backoff (up to {backoff.cap:.0f} s between listings)"

    #: set for the one-adapter source of a list entry (`single_adapter`): that adapter's URL
    single: S3Url | None = None
    watch_folder = None  # (a store sends no events here: it is listed every interval)

    @classmethod
    def single_adapter(cls, url: S3Url, **options: Any) -> S3Source:
        """The source of the one adapter at `url` (s3://BUCKET/PREFIX/NAME/): its parent
        prefix, listed below NAME/ only."""
        parent, _, name = url.prefix.rstrip("/").rpartition("/")
        source = cls(S3Url(url.bucket, f"{parent}/" if parent else ""), **options)
        source.single, source._only = url, name
        return source

    @property
    def label(self) -> str:
        return str(self.source)

    @property
    def on_change(self) -> Callable[[], None] | None:
        """Called (from a download's thread) when a scan would find something new."""
        return self.fetches.on_done

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.fetches.on_done = callback

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where this source's adapter files live (what a snapshot may read)."""
        return (Path(os.path.realpath(self.downloads)),)

    @property
    def settling(self) -> bool:
        """Some adapter waits only for a second listing to show it unchanged."""
        return any(seen.folder.kind is Kind.UPLOADING for seen in self._seen.values())

    # ---- passes ----

    def scan(self) -> list[AdapterFolder]:
        now = self.clock.now()
        if now < self._next_try:
            return self._folders()  # backing off after a failed listing
        try:
            listing, server_now = self._list()
        except Exception as exc:  # noqa: BLE001 - every failure is a reason, never a crash
            problem, self.fatal = explain(exc, self.source, self.endpoint)
            self.failures += 1
            self._next_try = now + self.backoff.delay(self.failures)
            self.source_problem = problem
            log.debug("listing %s failed (%d in a row): %s", self.source, self.failures, problem)
            return self._folders()
        self.source_problem, self.fatal, self.failures, self._next_try = None, False, 0, 0.0
        seen: dict[str, _Seen] = {}
        for name, objects in sorted(listing.items()):
            if any(adapter_file(key) for key in objects):  # (else absent: a README left)
                seen[name] = self._look(name, objects, now, server_now)
        self.fetches.forget(self.fetches.names() - set(seen))
        self.fetches.start()
        self._seen = seen
        self.fetches.collect({s.folder.path.name for s in seen.values()})
        return self._folders()

    def scan_at_start(self) -> list[AdapterFolder]:
        """The start-up listing, carried through: downloads are waited for, an upload caught
        in progress gets its second listing (waiting at most FIRST_SETTLE_MAX_SECS) and a
        failed download is tried again a few times, so the adapters present at start are
        served before the service says it is ready."""
        folders = self.scan()
        for _ in range(4):
            if self.source_problem is not None:
                break
            downloading = self.fetches.wait()
            retry = self.fetches.next_retry()
            wait = min(self.settle, FIRST_SETTLE_MAX_SECS) if self.settling else 0.0
            if retry is not None:
                wait = max(wait, min(retry, FIRST_SETTLE_MAX_SECS))
            if not downloading and not self.settling and retry is None:
                break
            self.clock.block(wait)
            folders = self.scan()
        return folders

    def wait_downloads(self, timeout: float | None = None) -> bool:
        """Wait for the downloads under way; True when there were any."""
        return self.fetches.wait(timeout)

    def next_retry(self) -> float | None:
        """Seconds until the first failed download may be tried again (None: none failed)."""
        return self.fetches.next_retry()

    def close(self) -> None:
        """Stop downloading (a download under way ends at its next chunk)."""
        self.fetches.close()

    def _folders(self) -> list[AdapterFolder]:
        return [seen.folder for seen in self._seen.values()]

    def _look(self, name: str, objects: dict[str, StoredObject], now: float,
              server_now: float) -> _Seen:
        """Adapter `name` as this listing shows it."""
        fingerprint = adapter_fingerprint(objects)
        before = self._seen.get(name)
        old = before.listed if before is not None else None
        since = old.since if old is not None and old.fingerprint == fingerprint else now
        current = Listed(objects, fingerprint, since,
                         weights_new=weights_of(objects) != weights_of(old.objects if old else {}),
                         fresh=old is None or (old.fresh and old.fingerprint == fingerprint))
        if before is not None and before.folder.fingerprint == fingerprint and \
                not before.folder.pending:
            return _Seen(current, before.folder)
        folder = self._judge(name, current, old, now, server_now)
        return _Seen(current, folder or self.fetches.folder_of(
            self._placeholder(name, fingerprint), current))

    def _list(self) -> tuple[dict[str, dict[str, StoredObject]], float]:
        """Every adapter's objects under the prefix, and the store's clock (POSIX seconds)."""
        adapters: dict[str, dict[str, StoredObject]] = {}
        server_now = self.clock.wall()
        prefix = self.source.prefix
        paginator = self.client.get_paginator("list_objects_v2")
        first = True
        listed = f"{prefix}{self._only}/" if self._only else prefix
        for page in paginator.paginate(Bucket=self.source.bucket, Prefix=listed):
            self.list_calls += 1
            if page.get("Name") != self.source.bucket:  # a 200 that is no ListBucketResult
                raise NotS3(f"the endpoint {self.endpoint} answered a listing of bucket "
                            f"'{self.source.bucket}' with something that is not an S3 listing "
                            "(a proxy or maintenance page?); check AWS_ENDPOINT_URL")
            if first:  # (read as its offset from ours: the clock passed in is the one read)
                stamped = server_time(page)
                server_now += stamped - time.time() if stamped is not None else 0.0
                first = False
            for item in page.get("Contents", ()):
                name, _, rest = item["Key"][len(prefix):].partition("/")
                if not rest or name.startswith("."):
                    continue  # a key beside the adapters, a folder marker, a hidden prefix
                adapters.setdefault(name, {})[rest] = StoredObject(
                    int(item.get("Size", 0)), str(item.get("ETag", "")),
                    item["LastModified"].timestamp() if item.get("LastModified") else 0.0)
        return adapters, server_now

    # ---- judging ----

    def _placeholder(self, name: str, fingerprint: str) -> AdapterFolder:
        return AdapterFolder(name=display_name(name), path=self.downloads / name,
                             fingerprint=fingerprint, url=self.source.url(display_name(name)))

    def _judge(self, name: str, current: Listed, old: Listed | None, now: float,
               server_now: float) -> AdapterFolder | None:
        """Why adapter `name` is not downloaded now (an AdapterFolder saying so), or None:
        complete, download it."""
        base = self._placeholder(name, current.fingerprint)
        url = base.url
        if (problem := name_problem(name)) is not None:
            return replace(base, problem=f"prefix name {problem}")
        if self.served_name and name == self.served_name:
            return replace(base, problem="prefix name equals the served model name; rename it")
        if fetched_whole(self.downloads / f"{name}-{current.fingerprint}", limit=self.limit):
            return None  # downloaded whole before (by the start-up listing): complete
        direct = {k: o for k, o in current.objects.items() if "/" not in k}
        if not any(adapter_file(key) for key in direct):
            return replace(base, problem=f"no adapter files directly under {url}; an adapter's "
                           "adapter_config.json and weights go directly under PREFIX/<name>/")
        weights = next((w for w in WEIGHT_FILES if w in direct), None)
        if CONFIG_FILE not in direct:
            return replace(base, pending=True,
                           problem="incomplete: adapter_config.json not uploaded yet")
        if weights is None:
            return replace(base, pending=True,
                           problem="incomplete: no adapter_model.safetensors uploaded yet")
        if direct[CONFIG_FILE].size > MAX_CONFIG_BYTES:
            return replace(base, problem=f"adapter_config.json is {direct[CONFIG_FILE].size} "
                           f"bytes; a config over {MAX_CONFIG_BYTES >> 20} MiB is not read")
        if self._complete(current, old, now, server_now):
            return None
        return replace(base, pending=True, kind=Kind.UPLOADING, problem="uploading: its objects "
                       "changed since the last listing; waiting for a listing that shows them "
                       "unchanged")

    def _complete(self, current: Listed, old: Listed | None, now: float,
                  server_now: float) -> bool:
        """Never half an adapter: its config and weights were the same in two listings
        `settle` seconds apart, or (first seen) are all older than that by the store's clock, or
        the weights arrived in the last listing and the config in this one (weights first,
        config last: the upload is done). A config that changes while the weights stay as they
        were is not enough: that is also how an upload that sends the config first looks."""
        if now - current.since >= self.settle:
            return True
        if current.fresh:  # as first listed: all older than `settle` by the store's clock will do
            own = [o for key, o in current.objects.items() if key in ADAPTER_FILES]
            if server_now - max(o.modified for o in own) >= self.settle + 1.0:  # (1 s steps)
                return True
        # (not for a change: a multipart object's LastModified is when its upload began)
        if old is None or not old.weights_new:
            return False
        before, after = old.objects.get(CONFIG_FILE), current.objects[CONFIG_FILE]
        return (weights_of(old.objects) == weights_of(current.objects)
                and (before is None or before.etag != after.etag))
