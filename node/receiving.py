"""pynetdicom's temporary files for incoming C-STOREs, in a folder the node owns.

With ``STORE_RECV_CHUNKED_DATASET`` pynetdicom streams each received data set to a
``NamedTemporaryFile`` in the system's temporary folder and removes it after the
C-STORE handler ran; a C-STORE cut off mid-stream, or one pynetdicom refuses before the
handler, leaves its file behind, on a disk the spool's watermark does not watch.  Here
each association's files go to ``<spool>/receiving``, are tracked by the association's
reader thread (which creates them), and whatever is left is removed when the
association ends and when the receiver starts.  A write that fails (the disk is full)
is recorded instead of raised, so the handler answers a DICOM out-of-resources status
rather than pynetdicom aborting the association.
"""

from __future__ import annotations

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
    raising it in pynetdicom's reader, where it would abort the association."""

    def __init__(self, folder: ReceivingFolder) -> None:
        self._folder = folder
        self.name = str(folder.folder / f"{uuid.uuid4().hex}.dcm")
        self.failed = False
        self._handle: BinaryIO | None = None
        self._guarded(self._create)

    @property
    def file(self) -> ReceivingFile:
        """pynetdicom flushes ``file.flush()`` after each fragment."""
        return self

    def write(self, data: bytes) -> int:
        self._guarded(lambda: self._open_handle().write(data))
        return len(data)

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
            self._folder.record_failure(self.name)
            self.failed = True


class ReceivingFolder:
    """The folder of one receiver's in-flight C-STORE data sets."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[threading.Thread, list[ReceivingFile]] = {}
        self._failed: set[str] = set()

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
            self._failed.difference_update(received.name for received in files)
        for received in files:
            received.close()
            Path(received.name).unlink(missing_ok=True)

    def write_failed(self, path: Path | str) -> bool:
        """True when part of the data set at ``path`` could not be written."""
        with _lock:
            return str(path) in self._failed

    def open(self) -> ReceivingFile:
        received = ReceivingFile(self)
        with _lock:
            self._files.setdefault(threading.current_thread(), []).append(received)
        return received

    def record_failure(self, path: str) -> None:
        with _lock:
            self._failed.add(path)


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
