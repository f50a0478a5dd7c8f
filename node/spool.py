"""The spool: durable files under names the node generates, never from header values.

A file is written to a temporary name, fsynced, renamed into place and its folder
fsynced, so a crash leaves either the whole file or no file under the final name.
A received instance is written the same way from memory (C-STORE: ``PendingWrite``,
whose write and fsync run in a thread while the receiver checks the instance), or,
already on the spool's disk (STOW-RS), adopted without a copy: fsync, rename to a
generated name, fsync of the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from node.db import utcnow

TMP_SUFFIX = ".partial"
INCOMING_FOLDER = "incoming"
#: STOW-RS part files: a folder per web role, each held by a lock file beside it
#: (``node.web.part_folders``).
STOW_FOLDER = "stow"
STOW_LOCK_SUFFIX = ".lock"
COPY_CHUNK = 1 << 20
#: Threads that write and fsync received instances (each waits on the disk, not the CPU).
WRITER_THREADS = 16


class SpoolFull(Exception):
    """Free space is below the configured watermark; refuse new data until it returns."""


class Spool:
    """Files of received and derived instances, addressed by paths relative to the root."""

    def __init__(self, root: Path, min_free_mb: int = 0) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.root.mkdir(parents=True, exist_ok=True)
        self._durable_folders: set[Path] = set()
        self._folders_lock = threading.Lock()
        # Its threads start with the first received instance, not here.
        self._writers = ThreadPoolExecutor(WRITER_THREADS, "spool-writer")

    def new_incoming(self) -> str:
        """A fresh relative path for a received instance (date folder, random name)."""
        return f"{INCOMING_FOLDER}/{utcnow():%Y%m%d}/{uuid.uuid4().hex}.dcm"

    @staticmethod
    def derived(job_id: int, index: int) -> str:
        """The relative path of a job's ``index``-th derived instance."""
        return f"derived/{int(job_id)}/{int(index):05d}.dcm"

    @staticmethod
    def reused(job_id: int, position: int) -> str:
        """Where a job keeps a derived instance it took over from an earlier job."""
        return f"derived/{int(job_id)}/reused-{int(position):05d}.dcm"

    def link(self, existing: str, relative: str) -> Path:
        """Give the file at ``existing`` a second durable name (a hard link, else a copy).

        Each name can be purged with its own job without taking the file from the other.
        """
        source, final = self.path(existing), self.path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
        temporary.unlink(missing_ok=True)
        try:
            os.link(source, temporary)
        except OSError:  # a filesystem without hard links: a copy of its own

            def copy(handle: BinaryIO) -> None:
                with open(source, "rb") as original:
                    shutil.copyfileobj(original, handle)

            return self.write_atomic(relative, copy)
        os.replace(temporary, final)
        _fsync_dir(final.parent)
        return final

    def begin_received(self, data: bytes) -> PendingWrite:
        """Start writing a received instance's bytes, under a temporary name beside a
        fresh incoming path, in a writer thread (write and fsync wait on the disk, not on
        the interpreter lock): the caller goes on meanwhile."""
        relative = self.new_incoming()
        final = self.path(relative)
        self._durable_folder(final.parent)
        temporary = final.with_name(f"{final.name}{TMP_SUFFIX}")
        return PendingWrite(relative, final, self._writers.submit(_write_synced, temporary, data))

    def adopt(self, source: Path) -> str:
        """Move a file already on the spool's disk to a fresh incoming path, durably.

        The file is written once: its data is fsynced, it is renamed to a name the node
        generates and the folder that holds the new name is fsynced.  Returns the new
        relative path.
        """
        relative = self.new_incoming()
        final = self.path(relative)
        self._durable_folder(final.parent)
        descriptor = os.open(source, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(source, final)
        _fsync_dir(final.parent)
        return relative

    def _durable_folder(self, folder: Path) -> None:
        """Create ``folder`` with its entries fsynced up to the root, once per process.

        Under a lock: another thread must not put a file into a folder whose own entry
        is not on disk yet, or a power loss could take an acknowledged file with it.
        """
        with self._folders_lock:
            if folder in self._durable_folders:
                return
            folder.mkdir(parents=True, exist_ok=True)
            for parent in (folder.parent, *folder.parent.parents):
                _fsync_dir(parent)
                if parent == self.root:
                    break
            self._durable_folders.add(folder)

    def sync_folder(self, folder: Path) -> None:
        """Make the entries of ``folder`` (under the root) durable, the folder's own too."""
        self._durable_folder(folder)
        _fsync_dir(folder)

    def path(self, relative: str) -> Path:
        """The absolute path of a relative spool path; refuses anything outside the root."""
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root):
            raise ValueError(f"spool path {relative!r} leaves the spool")
        return candidate

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self, needed: int = 0) -> None:
        free = self.free_bytes()
        if free - needed < self.min_free_bytes:
            raise SpoolFull(
                f"spool {self.root} has {free // 2**20} MiB free, below the "
                f"{self.min_free_bytes // 2**20} MiB watermark: free space or raise "
                "spool_min_free_mb"
            )

    def write_atomic(self, relative: str, write: Callable[[BinaryIO], None]) -> Path:
        """Write a file durably: temporary name, fsync, rename, fsync of the folder."""
        final = self.path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            with open(temporary, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return final

    def remove(self, relative: str) -> None:
        self.path(relative).unlink(missing_ok=True)

    def remove_partials(self, older_than: float = 600.0) -> int:
        """Delete temporary files a crash left behind; they were never acknowledged.

        Only files untouched for ``older_than`` seconds: another process (a worker
        sharing the spool) may be writing a fresh one right now.  STOW-RS part files
        have a suffix of their own: the web role, not this, clears them.
        """
        cutoff = time.time() - older_than
        removed = 0
        for partial in self.root.rglob(f"*{TMP_SUFFIX}"):
            try:
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class PendingWrite:
    """A received instance being written (``Spool.begin_received``): ``keep`` gives it its
    final name durably, ``discard`` removes it; one of them must follow."""

    def __init__(self, relative: str, final: Path, written: Future[Path]) -> None:
        self.relative = relative
        self._final = final
        self._written = written
        self._kept = False

    def keep(self) -> str:
        """Wait for the synchronous write, rename into place, fsync the folder: the
        relative path.  OSError (the disk is full) when the write failed; nothing is left then."""
        os.replace(self._written.result(), self._final)
        self._kept = True
        _fsync_dir(self._final.parent)
        return self.relative

    def discard(self) -> None:
        """Remove what was written unless ``keep`` gave it its name (after the writer is
        done: a refused instance leaves no file)."""
        if self._kept:
            return
        with suppress(OSError):  # a failed write removed its file
            self._written.result().unlink(missing_ok=True)


def _write_synced(temporary: Path, data: bytes) -> Path:
    """Create ``temporary`` and write ``data`` to it synchronously: its name.  O_SYNC
    makes each write return once data and metadata are on disk, as a write followed by
    fsync would, in one call that waits without the interpreter lock.  A failed write
    removes the file and raises."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC
    descriptor = os.open(temporary, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    return temporary


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_content(path: Path) -> tuple[str, int]:
    """A file's SHA-256 and size, as the job table records them, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
