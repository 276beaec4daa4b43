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

import concurrent.futures
import email.utils
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from entrypoint.adapters.files import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHT_FILES
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import display_name, name_problem
from entrypoint.adapters.rank import RankLimit
from entrypoint.sources.folder import AdapterScanner

log = logging.getLogger(__name__)

SCHEME = "s3://"
#: objects unchanged this long (two listings apart, or by the store's clock) are complete
SETTLE_SECS = 1.0
BACKOFF_BASE_SECS = 1.0
BACKOFF_MAX_SECS = 60.0
DOWNLOADERS = 8
FIRST_SETTLE_MAX_SECS = 5.0  # the longest start-up waits for an upload caught in progress
CONNECT_TIMEOUT_SECS = 5.0
READ_TIMEOUT_SECS = 10.0  # per read of the socket, not per object
CHUNK = 1 << 20
ADAPTER_FILES = frozenset((CONFIG_FILE, *WEIGHT_FILES))  # directly under PREFIX/NAME/
INSTALL = "pip install 'lora-entrypoint[s3]' (the container image includes it)"


class S3Error(Exception):
    """An S3 source that cannot be used; the message names the variable to fix."""


class NotS3(Exception):
    """The endpoint answered, but not as an S3 store does."""


@dataclass(frozen=True)
class S3Url:
    """`s3://BUCKET/PREFIX`: the prefix is empty or ends with '/'."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> S3Url:
        """Raises ValueError (with what to write instead) for a malformed URL."""
        if not text.startswith(SCHEME):
            raise ValueError(f"{text!r} is not an s3:// URL")
        bucket, _, prefix = text[len(SCHEME):].partition("/")
        if not bucket or any(c in bucket for c in " \\?#") or len(bucket) > 255:
            raise ValueError("write s3://BUCKET/PREFIX (the bucket name is missing or invalid)")
        prefix = prefix.strip("/")
        if any(not part or part in (".", "..") for part in prefix.split("/")) and prefix:
            raise ValueError("the prefix has an empty, '.' or '..' part; write "
                             "s3://BUCKET/PATH/TO/ADAPTERS")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}"

    def url(self, name: str) -> str:
        """The URL of adapter `name` (shown as its source)."""
        return f"{SCHEME}{self.bucket}/{self.prefix}{name}/"


def make_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client from the standard AWS chain: AWS_* variables, profiles, web identity;
    AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible stores, unless `endpoint` is
    given. No retry inside; the scanner backs off across passes."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise S3Error(f"the S3 client (boto3) is not installed: {INSTALL}") from None
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
    except BotoCoreError as exc:  # AWS_PROFILE naming no profile, a broken config file
        raise S3Error(f"the AWS configuration cannot be read ({exc}); check AWS_PROFILE and "
                      "AWS_CONFIG_FILE") from None
    # A store that accepts connections and never answers must not hold a pass (and the runtime
    # API waiting on it) for minutes: short timeouts, no retry inside (the scanner backs off).
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                    connect_timeout=CONNECT_TIMEOUT_SECS, read_timeout=READ_TIMEOUT_SECS,
                    max_pool_connections=DOWNLOADERS * 2, user_agent_extra="lora-entrypoint")
    try:
        return session.client("s3", region_name=region, config=config, endpoint_url=endpoint)
    except (ValueError, BotoCoreError) as exc:
        raise S3Error(f"the S3 client cannot be set up ({exc}); check AWS_ENDPOINT_URL (a URL "
                      "such as http://minio:9000) and AWS_DEFAULT_REGION") from None


def explain(exc: Exception, url: S3Url, endpoint: str) -> tuple[str, bool]:
    """A one-line reason for a failed store call naming what to check, and whether it is a
    setting error (bad credentials, a missing bucket) rather than an outage."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or a web identity: AWS_ROLE_ARN and "
                "AWS_WEB_IDENTITY_TOKEN_FILE)", True)
    if isinstance(exc, NotS3):
        return str(exc), True
    if isinstance(exc, bx.ParamValidationError):  # (the client checks names before sending)
        return (f"the store's client refused the request ({exc}); check the bucket name in "
                "NIM_PEFT_SOURCE", True)
    if isinstance(exc, bx.ReadTimeoutError):
        return (f"the store at {endpoint} accepted the connection but did not answer within "
                f"{READ_TIMEOUT_SECS:.0f} s; check AWS_ENDPOINT_URL and the store", False)
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError
                  | bx.ConnectionClosedError):
        return (f"the store at {endpoint} cannot be reached; check AWS_ENDPOINT_URL and the "
                "network", False)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return (f"bucket '{url.bucket}' does not exist at {endpoint}; check the bucket in "
                    "NIM_PEFT_SOURCE (and AWS_ENDPOINT_URL)", True)
        if code == "InvalidAccessKeyId":
            return ("the store does not know this access key; check AWS_ACCESS_KEY_ID", True)
        if code == "SignatureDoesNotMatch":
            return ("the store refused the request's signature; check AWS_SECRET_ACCESS_KEY "
                    "(it does not match AWS_ACCESS_KEY_ID)", True)
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            return (f"the session token was refused ({code}); refresh AWS_SESSION_TOKEN", True)
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return (f"access denied to {url}; the credentials need s3:ListBucket on bucket "
                    f"'{url.bucket}' and s3:GetObject under its prefix", True)
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                    "IllegalLocationConstraintException"):
            return (f"bucket '{url.bucket}' is in another region ({code}); set "
                    "AWS_DEFAULT_REGION to the bucket's region", True)
        if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "TooManyRequests") or status in (429, 503):
            return f"the store is throttling requests ({code or status}); backing off", False
        message = str(error.get("Message", "")) or "no message"
        return f"the store answered {code or status} ({message})", 400 <= status < 500
    return f"{type(exc).__name__}: {exc}", False


@dataclass(frozen=True)
class _Object:
    size: int
    etag: str
    modified: float  # POSIX seconds (the store's clock)


@dataclass(frozen=True)
class _Listed:
    """One adapter's objects in one listing, and when this exact set was first seen."""

    objects: dict[str, _Object]  # the key below PREFIX/NAME/ -> object
    fingerprint: str  # of the adapter's own files (config and weights) only
    since: float  # monotonic
    weights_new: bool = False  # this listing is the first to show the current weights
    #: unchanged since this scanner first listed the adapter (the store's clock may judge it)
    fresh: bool = True


def _fingerprint(objects: dict[str, _Object]) -> str:
    """Of the adapter's own files: a README or a training log beside them changes nothing."""
    parts = sorted(f"{key}\0{o.size}\0{o.etag}" for key, o in objects.items()
                   if key in ADAPTER_FILES)
    return hashlib.blake2b("\0".join(parts).encode(errors="surrogateescape"),
                           digest_size=12).hexdigest()


class S3Scanner:
    """Lists an S3 prefix again and again and describes each adapter under it as an
    `AdapterFolder` whose files are a local, complete download (the same interface as
    `AdapterScanner`). Never raises from `scan`: a failed listing is `source_problem`."""

    def __init__(self, source: S3Url, *, downloads: Path, limit: RankLimit | None = None,
                 served_name: str | None = None, client: Any = None,
                 settle: float = SETTLE_SECS) -> None:
        self.source = source
        #: how long an adapter's objects must stay unchanged (the refresh interval in `serve`:
        #: two consecutive listings)
        self.settle = max(SETTLE_SECS, settle)
        self.downloads = downloads
        self.limit = limit
        self.served_name = served_name
        self.client = client if client is not None else make_client()
        self.endpoint = str(getattr(self.client.meta, "endpoint_url", "") or "AWS S3")
        self._known: dict[str, AdapterFolder] = {}
        self._listed: dict[str, _Listed] = {}
        #: why the last listing failed (None: it worked); `fatal`: a setting, not an outage
        self.source_problem: str | None = None
        self.fatal = False
        self.failures = 0
        self._next_try = 0.0
        self.list_calls = 0
        # Downloads run beside the passes (a large adapter never holds up the others): an
        # adapter is pending ("downloading") until its download is done, then the next pass
        # takes it. `on_download` is called (from the download's thread) when one ends.
        self._pool = concurrent.futures.ThreadPoolExecutor(DOWNLOADERS,
                                                           thread_name_prefix="s3-download")
        self._inflight: dict[str, tuple[str, concurrent.futures.Future[AdapterFolder]]] = {}
        self._closed = threading.Event()
        self.on_download: Callable[[], None] | None = None
        self._reported: dict[str, str] = {}  # the last download problem logged, per adapter
        self._want: dict[str, str] = {}  # the version of each adapter a download is wanted of
        self._running: set[concurrent.futures.Future[AdapterFolder]] = set()
        #: failed downloads: name -> (fingerprint, failures in a row, retry after, reason)
        self._failed: dict[str, tuple[str, int, float, str]] = {}
        self._to_start: list[tuple[int, AdapterFolder, _Listed]] = []

    #: what the service does while `source_problem` lasts (it logs this once)
    retry_hint = f"retrying with backoff (up to {BACKOFF_MAX_SECS:.0f} s between listings)"

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where this scanner's adapter files live (what a snapshot may read)."""
        return (Path(os.path.realpath(self.downloads)),)

    @property
    def settling(self) -> bool:
        """Some adapter waits only for a second listing to show it unchanged."""
        return any(f.pending and f.problem and f.problem.startswith("uploading")
                   for f in self._known.values())

    # ---- passes ----

    def scan(self) -> list[AdapterFolder]:
        now = time.monotonic()
        if now < self._next_try:
            return list(self._known.values())  # backing off after a failed listing
        try:
            listing, server_now = self._list()
        except Exception as exc:  # noqa: BLE001 - every failure is a reason, never a crash
            problem, self.fatal = explain(exc, self.source, self.endpoint)
            self.failures += 1
            self._next_try = now + _backoff(self.failures)
            self.source_problem = problem
            log.debug("listing %s failed (%d in a row): %s", self.source, self.failures, problem)
            return list(self._known.values())
        self.source_problem, self.fatal, self.failures, self._next_try = None, False, 0, 0.0
        known: dict[str, AdapterFolder] = {}
        listed: dict[str, _Listed] = {}
        for name, objects in sorted(listing.items()):
            if not any(_adapter_file(key) for key in objects):
                continue  # no adapter files at all (a README left, a folder marker): absent
            fingerprint = _fingerprint(objects)
            old = self._listed.get(name)
            since = old.since if old is not None and old.fingerprint == fingerprint else now
            listed[name] = current = _Listed(
                objects, fingerprint, since,
                weights_new=_weights(objects) != _weights(old.objects if old else {}),
                fresh=old is None or (old.fresh and old.fingerprint == fingerprint))
            kept = self._known.get(name)
            if kept is not None and kept.fingerprint == fingerprint and not kept.pending:
                known[name] = kept
                continue
            known[name] = self._judge(name, current, old, now, server_now) or \
                self._downloaded(name, current)
        for name in set(self._want) - set(known):
            self._want.pop(name)  # its prefix went: its download stops, its result is unwanted
            self._inflight.pop(name, None)
            self._failed.pop(name, None)
        self._start_downloads()
        self._listed, self._known = listed, known
        self._collect()
        return list(known.values())

    def next_retry(self) -> float | None:
        """Seconds until the first failed download may be tried again (None: none failed)."""
        if not self._failed:
            return None
        return max(0.0, min(f[2] for f in self._failed.values()) - time.monotonic())

    def wait_downloads(self, timeout: float | None = None) -> bool:
        """Wait for the downloads under way; True when there were any."""
        futures = [future for _, future in self._inflight.values()]
        concurrent.futures.wait(futures, timeout=timeout)
        return bool(futures)

    def close(self) -> None:
        """Stop downloading (a download under way ends at its next chunk)."""
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _list(self) -> tuple[dict[str, dict[str, _Object]], float]:
        """Every adapter's objects under the prefix, and the store's clock (POSIX seconds)."""
        adapters: dict[str, dict[str, _Object]] = {}
        server_now = time.time()
        prefix = self.source.prefix
        paginator = self.client.get_paginator("list_objects_v2")
        first = True
        for page in paginator.paginate(Bucket=self.source.bucket, Prefix=prefix):
            self.list_calls += 1
            if page.get("Name") != self.source.bucket:  # a 200 that is no ListBucketResult
                raise NotS3(f"the endpoint {self.endpoint} answered a listing of bucket "
                            f"'{self.source.bucket}' with something that is not an S3 listing "
                            "(a proxy or maintenance page?); check AWS_ENDPOINT_URL")
            if first:
                server_now = _server_time(page) or server_now
                first = False
            for item in page.get("Contents", ()):
                name, _, rest = item["Key"][len(prefix):].partition("/")
                if not rest or name.startswith("."):
                    continue  # a key beside the adapters, a folder marker, a hidden prefix
                adapters.setdefault(name, {})[rest] = _Object(
                    int(item.get("Size", 0)), str(item.get("ETag", "")),
                    item["LastModified"].timestamp() if item.get("LastModified") else 0.0)
        return adapters, server_now

    # ---- judging ----

    def _placeholder(self, name: str, fingerprint: str) -> AdapterFolder:
        return AdapterFolder(name=display_name(name), path=self.downloads / name,
                             fingerprint=fingerprint, url=self.source.url(display_name(name)))

    def _judge(self, name: str, current: _Listed, old: _Listed | None, now: float,
               server_now: float) -> AdapterFolder | None:
        """Why adapter `name` is not downloaded now (an AdapterFolder saying so), or None:
        complete, download it."""
        base = self._placeholder(name, current.fingerprint)
        url = base.url
        if (problem := name_problem(name)) is not None:
            return replace(base, problem=f"prefix name {problem}")
        if self.served_name and name == self.served_name:
            return replace(base, problem="prefix name equals the served model name; rename it")
        if (self.downloads / f"{name}-{current.fingerprint}").is_dir():
            return None  # downloaded whole before (by the start-up listing): complete
        direct = {k: o for k, o in current.objects.items() if "/" not in k}
        if not any(_adapter_file(key) for key in direct):
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
        return replace(base, pending=True, problem="uploading: its objects changed since the "
                       "last listing; waiting for a listing that shows them unchanged")

    def _complete(self, current: _Listed, old: _Listed | None, now: float,
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
        return (_weights(old.objects) == _weights(current.objects)
                and (before is None or before.etag != after.etag))

    # ---- downloading ----

    def _downloaded(self, name: str, listed: _Listed) -> AdapterFolder:
        """A complete adapter: its download when done, else pending while it is (started in
        the background now when it is not under way)."""
        base = self._placeholder(name, listed.fingerprint)
        job = self._inflight.get(name)
        if job is not None and job[0] == listed.fingerprint:
            if not job[1].done():
                return replace(base, pending=True, problem=self._downloading(name, base))
            del self._inflight[name]
            try:
                return job[1].result()
            except Exception as exc:  # noqa: BLE001 - (_fetch catches its own; never a crash)
                return replace(base, pending=True, problem=f"download failed ({exc!r}); "
                               "looking again")
        if (self.downloads / f"{name}-{listed.fingerprint}").is_dir():
            return self._fetch(base, listed)  # downloaded before: inspected at once
        failed = self._failed.get(name)
        if failed is not None and failed[0] == listed.fingerprint and \
                time.monotonic() < failed[2]:
            return replace(base, pending=True, problem=failed[3])  # backing off
        self._want[name] = listed.fingerprint  # (an older download of it stops at its next chunk)
        self._to_start.append((sum(o.size for k, o in listed.objects.items()
                                   if k in ADAPTER_FILES), base, listed))
        return replace(base, pending=True, problem=self._downloading(name, base))

    def _downloading(self, name: str, base: AdapterFolder) -> str:
        """The reason shown while a download runs: a retry keeps its failure's reason."""
        failed = self._failed.get(name)
        return failed[3] if failed is not None and failed[0] == base.fingerprint else \
            f"downloading from {base.url}"

    def _start_downloads(self) -> None:
        """Start the downloads this pass asked for, smallest first (a small adapter is not
        queued behind large ones started in the same pass)."""
        for _, base, listed in sorted(self._to_start, key=lambda job: job[0]):
            future = self._pool.submit(self._fetch, base, listed)
            self._inflight[base.name] = (listed.fingerprint, future)
            self._running.add(future)
            future.add_done_callback(self._done)
        self._to_start = []

    def _wanted(self, name: str, fingerprint: str) -> bool:
        return self._want.get(name) == fingerprint

    def _done(self, future: concurrent.futures.Future[AdapterFolder]) -> None:
        """A download ended: a pass takes its result now when it is usable (a failed one is
        tried again after its backoff, at a pass that comes anyway)."""
        self._running.discard(future)
        usable = not future.cancelled() and future.exception() is None and not (
            future.result().pending)
        if usable and self.on_download is not None and not self._closed.is_set():
            self.on_download()

    def _fetch(self, base: AdapterFolder, listed: _Listed) -> AdapterFolder:
        """Download a complete adapter (once per fingerprint) and inspect it like a folder."""
        name = base.name
        target = self.downloads / f"{name}-{listed.fingerprint}"
        try:
            if not target.is_dir():
                self._download(name, listed, target)
        except _Changed as exc:
            return replace(base, pending=True, problem=f"uploading: {exc}; looking again")
        except _Unwanted:
            return replace(base, pending=True, problem="download called off; looking again")
        except Exception as exc:  # noqa: BLE001 - one adapter's failure is its own reason
            problem, _ = explain(exc, self.source, self.endpoint) if not isinstance(
                exc, OSError) else (f"cannot be written under NIM_CACHE_PATH ({exc})", False)
            reason = f"download failed: {problem}; retrying with backoff"
            old = self._failed.get(name)
            failures = old[1] + 1 if old is not None and old[0] == listed.fingerprint else 1
            self._failed[name] = (listed.fingerprint, failures,
                                  time.monotonic() + _backoff(failures), reason)
            if self._reported.get(name) != problem:  # once per problem, not once per pass
                self._reported[name] = problem
                log.warning("adapter %s: download from %s failed: %s; retrying with backoff",
                            name, base.url, problem)
            return replace(base, pending=True, problem=reason)
        self._reported.pop(name, None)
        self._failed.pop(name, None)
        folder = inspect_folder(target, limit=self.limit, served_name=self.served_name,
                                name=name, complete=True)
        return replace(folder, fingerprint=listed.fingerprint,
                       local_fingerprint=folder.fingerprint, url=base.url)

    def _download(self, name: str, listed: _Listed, target: Path) -> None:
        from botocore.exceptions import ClientError

        self.downloads.mkdir(parents=True, exist_ok=True)
        temporary = self.downloads / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            weights = next(w for w in WEIGHT_FILES if w in listed.objects)
            for key in (CONFIG_FILE, weights):
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
                path = temporary / key
                with path.open("wb") as out:
                    body = answer["Body"]
                    while chunk := body.read(CHUNK):
                        if self._closed.is_set() or not self._wanted(name, listed.fingerprint):
                            raise _Unwanted()
                        out.write(chunk)
                if path.stat().st_size != expected.size or (
                        answer.get("ETag") and answer["ETag"] != expected.etag):
                    raise _Changed(f"{key} changed during the download")
                os.utime(path, (expected.modified, expected.modified))
            try:
                temporary.rename(target)
            except OSError:
                if not target.is_dir():  # (else: the same version, downloaded by another)
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _collect(self) -> None:
        """Delete downloads no adapter is described by any more (a new version, a removed
        prefix) and unfinished ones left by a crash. Snapshots are copies: nothing served
        reads these."""
        keep = {f.path.name for f in self._known.values()}
        keep |= {f"{name}-{fingerprint}" for name, (fingerprint, _) in self._inflight.items()}
        busy = bool(self._running)  # (superseded downloads too: their .tmp-* is theirs)
        try:
            entries = list(os.scandir(self.downloads))
        except OSError:
            return
        for entry in entries:
            if entry.name not in keep and not (busy and entry.name.startswith(".tmp-")):
                shutil.rmtree(entry.path, ignore_errors=True)


def _adapter_file(key: str) -> bool:
    """`key` (below PREFIX/NAME/) is an adapter's config or weights, at any depth."""
    return key.rsplit("/", 1)[-1] in (CONFIG_FILE, *WEIGHT_FILES)


def _backoff(failures: int) -> float:
    """Seconds to wait after `failures` failed calls in a row (listings, a download)."""
    return min(BACKOFF_MAX_SECS, BACKOFF_BASE_SECS * 2 ** (failures - 1))


def _weights(objects: dict[str, _Object]) -> tuple[tuple[str, int, str], ...]:
    """The adapter's weights files, as listed."""
    return tuple((k, objects[k].size, objects[k].etag) for k in WEIGHT_FILES if k in objects)


class _Changed(Exception):
    """The objects changed between the listing and the download."""


class _Unwanted(Exception):
    """The download is no longer wanted (its prefix went, a newer version came, stopping)."""


def _server_time(page: dict[str, Any]) -> float | None:
    """The store's clock from an answer's Date header (LastModified is on the same clock)."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


def first_scan(scanner: S3Scanner) -> list[AdapterFolder]:
    """The start-up listing, carried through: downloads are waited for, an upload caught in
    progress gets its second listing (waiting at most FIRST_SETTLE_MAX_SECS) and a failed
    download is tried again a few times, so the adapters present at start are served before
    the service says it is ready."""
    folders = scanner.scan()
    for _ in range(4):
        if scanner.source_problem is not None:
            break
        downloading = scanner.wait_downloads()
        retry = scanner.next_retry()
        wait = min(scanner.settle, FIRST_SETTLE_MAX_SECS) if scanner.settling else 0.0
        if retry is not None:
            wait = max(wait, min(retry, FIRST_SETTLE_MAX_SECS))
        if not downloading and not scanner.settling and retry is None:
            break
        time.sleep(wait)
        folders = scanner.scan()
    return folders


def source_scanner(source: Path | S3Url, *, downloads: Path, limit: RankLimit | None = None,
                   served_name: str | None = None,
                   settle: float = SETTLE_SECS) -> AdapterScanner | S3Scanner:
    """The scanner for NIM_PEFT_SOURCE: a folder's, or an S3 prefix's (whose adapters are
    downloaded under `downloads`, once unchanged for `settle` seconds). Raises S3Error when the
    S3 client cannot be made."""
    if isinstance(source, S3Url):
        return S3Scanner(source, downloads=downloads, limit=limit, served_name=served_name,
                         settle=settle)
    return AdapterScanner(source, limit=limit, served_name=served_name)
