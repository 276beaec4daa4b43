"""Where adapters come from: a folder, an S3 store, a list file (folders, S3 prefixes, Hub
repositories), the runtime API's intent. `source_for` picks NIM_PEFT_SOURCE's."""

from __future__ import annotations

from pathlib import Path

from entrypoint.adapters.rank import RankLimit
from entrypoint.clock import REAL, Clock
from entrypoint.sources.base import AdapterSource
from entrypoint.sources.folder import FolderSource
from entrypoint.sources.listfile import ListSource, is_list_file
from entrypoint.sources.s3 import SETTLE_SECS, S3Source
from entrypoint.sources.s3_client import S3Url


def source_for(source: Path | S3Url, *, downloads: Path, limit: RankLimit | None = None,
               served_name: str | None = None, settle: float = SETTLE_SECS,
               clock: Clock = REAL) -> AdapterSource:
    """The source for NIM_PEFT_SOURCE: a folder's, or an S3 prefix's (whose adapters are
    downloaded under `downloads`, once unchanged for `settle` seconds). Raises S3Error when the
    S3 client cannot be made."""
    if isinstance(source, S3Url):
        return S3Source(source, downloads=downloads, limit=limit, served_name=served_name,
                        settle=settle, clock=clock)
    if is_list_file(source):
        return ListSource(source, downloads=downloads, limit=limit, served_name=served_name,
                          clock=clock)
    return FolderSource(source, limit=limit, served_name=served_name)
