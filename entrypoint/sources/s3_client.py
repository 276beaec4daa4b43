"""The S3 store as this service speaks to it: `s3://BUCKET/PREFIX` parsed, the client made
from the standard AWS chain (short timeouts, no retry inside), failures explained in one line,
and a listing's objects as plain data (`StoredObject`, `Listed`).

Must not decide anything about adapters (complete, wanted, served).
"""

from __future__ import annotations

import email.utils
import hashlib
from dataclasses import dataclass
from typing import Any

from entrypoint.adapters.files import CONFIG_FILE, WEIGHT_FILES

SCHEME = "s3://"


CONNECT_TIMEOUT_SECS = 5.0


READ_TIMEOUT_SECS = 10.0  # per read of the socket, not per object


POOL_CONNECTIONS = 16  # two per download thread
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
                    max_pool_connections=POOL_CONNECTIONS, user_agent_extra="lora-entrypoint")
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
class StoredObject:
    size: int
    etag: str
    modified: float  # POSIX seconds (the store's clock)


@dataclass(frozen=True)
class Listed:
    """One adapter's objects in one listing, and when this exact set was first seen."""

    objects: dict[str, StoredObject]  # the key below PREFIX/NAME/ -> object
    fingerprint: str  # of the adapter's own files (config and weights) only
    since: float  # monotonic
    weights_new: bool = False  # this listing is the first to show the current weights
    #: unchanged since this scanner first listed the adapter (the store's clock may judge it)
    fresh: bool = True


def adapter_fingerprint(objects: dict[str, StoredObject]) -> str:
    """Of the adapter's own files: a README or a training log beside them changes nothing."""
    parts = sorted(f"{key}\0{o.size}\0{o.etag}" for key, o in objects.items()
                   if key in ADAPTER_FILES)
    return hashlib.blake2b("\0".join(parts).encode(errors="surrogateescape"),
                           digest_size=12).hexdigest()


def adapter_file(key: str) -> bool:
    """`key` (below PREFIX/NAME/) is an adapter's config or weights, at any depth."""
    return key.rsplit("/", 1)[-1] in (CONFIG_FILE, *WEIGHT_FILES)


def weights_of(objects: dict[str, StoredObject]) -> tuple[tuple[str, int, str], ...]:
    """The adapter's weights files, as listed."""
    return tuple((k, objects[k].size, objects[k].etag) for k in WEIGHT_FILES if k in objects)


def server_time(page: dict[str, Any]) -> float | None:
    """The store's clock from an answer's Date header (LastModified is on the same clock)."""
    date = page.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


