"""Snapshots: private, content-named copies of adapter folders that the backend loads from.

Edits to or removal of a source folder can then never corrupt a served adapter, and changed
weights always arrive under a new path (vLLM keys its prefix cache on the path). Only file work
here: no backend calls, no registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from entrypoint.adapters.files import CONFIG_FILE, WEIGHT_FILES, open_regular
from entrypoint.adapters.folder import AdapterFolder, inspect_folder
from entrypoint.adapters.names import resolved, within

log = logging.getLogger(__name__)

CHUNK = 1 << 20
SNAPSHOT_FILES = (CONFIG_FILE, *WEIGHT_FILES, "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "added_tokens.json")


#: ioctl(2) FICLONE: make `dst` share `src`'s blocks, copy-on-write (XFS, btrfs, bcachefs)
FICLONE = 0x40049409


def _clone(src: int, dst: int) -> bool:
    """Make the empty file `dst` a copy-on-write clone of `src`; False where the filesystem
    cannot (ext4, tmpfs, two filesystems): then the caller copies."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError:
        return False
    return True


def _link(src: int, source: Path, target: Path) -> bool:
    """Hard-link `source` at `target` if it still is the file open as `src` (the one checked);
    False where that cannot be done (another filesystem) or its name leads elsewhere now."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        return False
    opened, linked = os.fstat(src), os.stat(target, follow_symlinks=False)
    if (linked.st_dev, linked.st_ino) != (opened.st_dev, opened.st_ino):
        target.unlink()
        return False
    return True


class SnapshotChanged(Exception):
    """The source folder changed while it was being copied; try again when it settles."""


class SnapshotRefused(Exception):
    """The folder's files cannot be served (a file that leads out of the allowed folders, a copy
    that does not validate while the source did): a one-line reason; refused until they change."""


class SnapshotFailed(Exception):
    """The snapshot folder cannot be written (full, read-only, gone): a one-line user message."""


#: how long a snapshot nothing serves any more is kept: vLLM may read an adapter's path again
#: after our side of its last request ended (aborts in flight, its own cache evictions)
RETIRE_GRACE_SECS = 30.0


class SnapshotStore:
    """Snapshots under `<NIM_CACHE_PATH>/snapshots/<instance>/<name>-<content hash>`.

    A snapshot nothing serves any more is retired, and deleted only after a grace period in
    which nothing used it; taking the same content again brings it back instead. Identical
    files are stored once: a snapshot of content another snapshot already holds (the same
    folder loaded through the API under many names) is made of hard links to its files, so
    each name keeps its own folder and lifetime while the bytes are on disk once. Thread-safe:
    takes and deletions run in worker threads.
    """

    def __init__(self, root: Path, *, grace: float = RETIRE_GRACE_SECS) -> None:
        self.root = root
        self.grace = grace
        self._lock = threading.Lock()
        self._retired: dict[Path, float] = {}  # path -> monotonic time it may be deleted
        self._kept: dict[Path, float] = {}  # held (a load of it timed out), or taken again
        # while retired: the time before which it may not be deleted
        self._content: dict[str, set[Path]] = {}  # content hash -> the snapshots holding it
        self.copied_bytes = 0  # bytes written by copying (not linked, not cloned)

    def _cache_error(self, exc: OSError) -> SnapshotFailed:
        return SnapshotFailed(
            f"cannot write a snapshot under NIM_CACHE_PATH ({self.root}): "
            f"{exc.strerror or exc}; free space there or make it writable")

    def take(self, folder: AdapterFolder, *, roots: Sequence[Path] = ()) -> Path:
        """Copy the adapter's files into a snapshot named by their content; return its path.

        Reads each source file once (hashing while copying), re-validates the copy, and raises
        `SnapshotChanged` if the source folder's fingerprint moved meanwhile, `SnapshotRefused`
        when a file it opened lies outside `roots` (when given; checked on the open file, so a
        link swapped in after the scan's check is caught too) or the copy does not validate
        while the source is unchanged, and `SnapshotFailed` when the snapshot folder cannot be
        written.
        """
        tmp = self.root / f".snapshot.{os.getpid()}.{threading.get_ident():x}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            raise self._cache_error(exc) from None
        digest = hashlib.blake2b(digest_size=16)
        try:
            for name in SNAPSHOT_FILES:
                self._copy(folder.path / name, tmp / name, digest, roots,
                           link=folder.private)
            copy = inspect_folder(tmp, name="snapshot")
            now = inspect_folder(folder.path).fingerprint
            if now != folder.files_fingerprint:
                raise SnapshotChanged(copy.problem or "files changed while copying")
            if not copy.valid:  # the same files, yet their copy is not an adapter
                raise SnapshotRefused(f"its files, as read, are not a valid adapter "
                                      f"({copy.problem})")
            content = digest.hexdigest()
            final = self.root / f"{folder.name}-{content}"
            with self._lock:
                if final in self._retired:  # served again: no longer to be deleted, but a
                    self._kept[final] = self._retired.pop(final)  # grace it had still holds
                try:
                    if final.exists():
                        shutil.rmtree(tmp)
                    else:
                        self._share(tmp, content)
                        os.replace(tmp, final)
                except OSError as exc:
                    raise self._cache_error(exc) from None
                self._content.setdefault(content, set()).add(final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _share(self, tmp: Path, content: str) -> None:
        """Replace the files of the fresh copy `tmp` by hard links to those of a snapshot that
        holds the same content, when there is one (where links cannot be made, the copy
        stays)."""
        existing = next((p for p in self._content.get(content, ()) if p.is_dir()), None)
        if existing is None:
            return
        for entry in os.scandir(tmp):
            link = tmp / f".{entry.name}.link"
            try:
                os.link(existing / entry.name, link)
                os.replace(link, entry.path)
            except OSError:
                with contextlib.suppress(OSError):
                    link.unlink()
                return

    def _forget(self, path: Path) -> None:
        """`path` is deleted (call with the lock held)."""
        holders = self._content.get(path.name.rsplit("-", 1)[-1])
        if holders is not None:
            holders.discard(path)
            if not holders:
                del self._content[path.name.rsplit("-", 1)[-1]]

    def _copy(self, source: Path, target: Path, digest: hashlib.blake2b,
              roots: Sequence[Path], *, link: bool) -> None:
        """Put one file (if it is there) into the snapshot and feed its name and bytes to
        `digest`: a hard link to the very file opened when `link` (a download of ours, never
        changed in place), else a copy-on-write clone where the filesystem makes one (XFS,
        btrfs), else a copy. Either way the source's bytes are read once (to hash them)."""
        try:
            src = open_regular(source)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SnapshotChanged(f"{source.name} cannot be read ({exc.strerror})") from None
        try:
            if roots and not within(opened_path(src, source), roots):
                raise SnapshotRefused(
                    f"{source.name} leads outside the folders adapters "
                    "may be loaded from; copy the file itself into the adapter's folder")
            digest.update(source.name.encode() + b"\0")
            if link and _link(src, source, target):
                self._hash(src, source, digest)
                return
            try:
                dst = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                raise self._cache_error(exc) from None
            try:
                if _clone(src, dst):  # the name is the clone's content, read from the clone
                    self._hash(dst, target, digest)
                else:
                    self._write(src, dst, source, digest)
                # No fsync: a snapshot only has to be visible to the backend (the page cache is
                # shared), and after a crash the folder is emptied at start. It cost ~10 ms a
                # file, most of serve's start with 100 adapters (benchmarks/gateway.py --start).
            finally:
                os.close(dst)
        finally:
            os.close(src)

    @staticmethod
    def _chunks(src: int, source: Path) -> Iterator[bytes]:
        while True:
            try:
                chunk = os.read(src, CHUNK)
            except OSError as exc:
                raise SnapshotChanged(f"{source.name} cannot be read ({exc.strerror})"
                                      ) from None
            if not chunk:
                return
            yield chunk

    def _hash(self, src: int, source: Path, digest: hashlib.blake2b) -> None:
        for chunk in self._chunks(src, source):
            digest.update(chunk)

    def _write(self, src: int, dst: int, source: Path, digest: hashlib.blake2b) -> None:
        for chunk in self._chunks(src, source):
            digest.update(chunk)
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
            except OSError as exc:
                raise self._cache_error(exc) from None
            with self._lock:
                self.copied_bytes += len(chunk)

    def retire(self, path: Path) -> None:
        """`path` is served no more: delete it once the grace period has passed unused.

        A grace already running, or a hold, is never shortened.
        """
        if path.parent == self.root:
            due = time.monotonic() + self.grace
            with self._lock:
                self._retired[path] = max(due, self._retired.get(path, 0.0),
                                          self._kept.get(path, 0.0))

    def hold(self, path: Path, seconds: float) -> None:
        """Keep `path` at least `seconds` from now, whatever retires it (a load of it timed out:
        the backend may still act on it)."""
        with self._lock:
            until = time.monotonic() + seconds
            self._kept[path] = max(until, self._kept.get(path, 0.0))
            if path in self._retired:
                self._retired[path] = max(self._retired[path], until)

    def delete_retired(self, *, in_use: Callable[[Path], bool]) -> list[Path]:
        """Delete the retired snapshots whose grace period is over; returns them.

        One that `in_use` says is still needed (requests running on its adapter) gets a new
        grace period instead.
        """
        deleted = []
        with self._lock:
            now = time.monotonic()
            self._kept = {p: t for p, t in self._kept.items() if t > now}  # expired holds
            for path, due in list(self._retired.items()):
                if due > now:
                    continue
                if in_use(path):
                    self._retired[path] = now + self.grace
                    continue
                del self._retired[path]
                self._kept.pop(path, None)
                self._forget(path)
                shutil.rmtree(path, ignore_errors=True)
                deleted.append(path)
        return deleted

    def next_deletion(self) -> float | None:
        """Seconds until the next retired snapshot may be deleted (None: none retired)."""
        with self._lock:
            if not self._retired:
                return None
            return max(0.0, min(self._retired.values()) - time.monotonic())

    def collect(self, keep: set[Path]) -> int:
        """Delete every snapshot not in `keep`; returns how many were deleted."""
        removed = 0
        keep = {p.resolve() for p in keep}
        try:
            entries = list(self.root.iterdir()) if self.root.is_dir() else []
            for entry in entries:
                if entry.resolve() in keep or not entry.is_dir():
                    continue
                if entry.name.startswith(".") and time.time() - entry.stat().st_mtime < 600:
                    continue  # a snapshot being written right now
                with self._lock:
                    self._forget(entry)
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        except OSError as exc:  # an unusable cache shows when a snapshot is taken
            log.warning("cannot clean up %s (%s)", self.root, exc.strerror or exc)
        return removed

    def remove_all(self) -> None:
        """Delete this store's folder and everything in it."""
        shutil.rmtree(self.root, ignore_errors=True)


def opened_path(fd: int, path: Path) -> str:
    """The file `fd` really is (links resolved as it was opened; Linux), else `path` resolved."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return resolved(str(path)) or ""
