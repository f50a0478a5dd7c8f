"""pynetdicom's temporary files for incoming C-STOREs, in a folder the node owns.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom streams each received data set to a
``NamedTemporaryFile`` in the system's temporary folder and removes it after the
C-STORE handler ran; a C-STORE cut off mid-stream, or one pynetdicom refuses before the
handler, leaves its file behind, on a disk the spool's watermark does not watch.  Here
each association's files go to ``<spool>/receiving``, are tracked by the association's
reader thread (which creates them), and whatever is left is removed when the
association ends and when the receiver starts.  A write that fails (the disk is full)
is recorded instead of raised, so the handler answers a DICOM out-of-resources status
rather than pynetdicom aborting the association.  Each file's SHA-256 and size are
taken from the bytes as they are written (in the association's reader thread, while
the rest of the data set is still arriving), so the handler never reads them again.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pynetdicom import dimse_messages

log = logging.getLogger(__name__)

_lock = threading.Lock()
_folder_of_reader: dict[threading.Thread, ReceivingFolder] = {}


class ReceivingFile:
    """A data set's file that records a failed create or write (disk full) instead of
    raising it in pynetdicom's reader, where it would abort the association; it hashes
    and counts the bytes it is given."""

    def __init__(self, folder: Path) -> None:
        self.name = str(folder / f"{uuid.uuid4().hex}.dcm")
        self.failed = False
        self.size = 0
        self._digest = hashlib.sha256()
        self._handle: BinaryIO | None = None
        self._guarded(self._create)

    @property
    def file(self) -> ReceivingFile:
        """pynetdicom flushes ``file.flush()`` after each fragment."""
        return self

    def write(self, data: bytes) -> int:
        self._guarded(lambda: self._open_handle().write(data))
        self._digest.update(data)
        self.size += len(data)
        return len(data)

    def sha256(self) -> str:
        """The hex SHA-256 of every byte written so far."""
        return self._digest.hexdigest()

    def flush(self) -> None:
        self._guarded(lambda: self._open_handle().flush())

    def close(self) -> None:
        """Everything was flushed fragment by fragment; a failure here loses nothing more."""
        try:
            if self._handle is not None:
                self._handle.close()
        except OSError:
            self.failed = True

    def _create(self) -> None:
        self._handle = open(self.name, "xb")  # noqa: SIM115 - closed by pynetdicom or release

    def _open_handle(self) -> BinaryIO:
        assert self._handle is not None
        return self._handle

    def _guarded(self, operation: Callable[[], object]) -> None:
        if self.failed:
            return
        try:
            operation()
        except OSError as exc:
            log.warning("cannot write a received data set: %s", exc.strerror)
            self.failed = True


class ReceivingFolder:
    """The folder of one receiver's in-flight C-STORE data sets."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[threading.Thread, list[ReceivingFile]] = {}
        self._by_name: dict[str, ReceivingFile] = {}

    def clear(self) -> int:
        """Remove every file (at start: no association is running yet)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.folder.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def track(self, reader: threading.Thread) -> None:
        """Files created by ``reader`` (an association's DUL thread) go to this folder."""
        with _lock:
            _folder_of_reader[reader] = self
            self._files[reader] = []

    def release(self, reader: threading.Thread) -> None:
        """The association is over: remove the files its C-STOREs left."""
        with _lock:
            _folder_of_reader.pop(reader, None)
            files = self._files.pop(reader, [])
            for received in files:
                self._by_name.pop(received.name, None)
        for received in files:
            received.close()
            Path(received.name).unlink(missing_ok=True)

    def received(self, path: Path | str) -> ReceivingFile:
        """The file of the data set at ``path`` (KeyError if it is not one of this folder's)."""
        with _lock:
            return self._by_name[str(path)]

    def open(self) -> ReceivingFile:
        received = ReceivingFile(self.folder)
        with _lock:
            self._files.setdefault(threading.current_thread(), []).append(received)
            self._by_name[received.name] = received
        return received


def _named_temporary_file(**kwargs: Any) -> Any:
    """pynetdicom's factory for received data sets: the reader's folder, if it has one."""
    with _lock:
        folder = _folder_of_reader.get(threading.current_thread())
    if folder is None:
        return tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115 - pynetdicom closes it
    return folder.open()


def install() -> None:
    """Route pynetdicom's received data sets through ``_named_temporary_file``.

    pynetdicom offers no setting for the folder; its module looks the factory up by
    name at each C-STORE, so replacing that name is the one hook it has.
    """
    dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined,assignment]
