"""Each web role's own folder for STOW-RS part files, on a spool several roles may share.

A web role writes the parts of the bodies it receives into ``<spool>/stow/<name>/``, where
``<name>`` is random and ``<spool>/stow/<name>.lock`` carries an ``flock`` for as long as the
role runs.  At its start a web role removes only what no running role holds: the folders
whose lock it can take (the kernel drops the lock of a process that ended, however it
ended) and part files left in ``<spool>/stow/`` itself by releases before these folders.
So a second web role starting on the same spool (another process behind the same proxy,
a restart beside a running one) never removes the parts of an upload the first is
receiving.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path

from node.spool import STOW_LOCK_SUFFIX as LOCK_SUFFIX
from node.web.multipart import PART_SUFFIX


class PartFolder:
    """This web role's folder of part files (``path``), held until the process ends."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        #: Part files that ended roles left, removed now.
        self.removed = remove_unheld(root)
        self._lock, self.path = _claim(root)
        self.path.mkdir()


def remove_unheld(root: Path) -> int:
    """Remove the folders under ``root`` that no running web role holds, and part files
    in ``root`` itself; how many part files went."""
    removed = 0
    for leftover in root.glob(f"*{PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)
        removed += 1
    for lock_path in root.glob(f"*{LOCK_SUFFIX}"):
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # another role removed it just now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its role is running
        try:
            folder = lock_path.with_suffix("")
            removed += len(list(folder.glob(f"*{PART_SUFFIX}")))
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def _claim(root: Path) -> tuple[int, Path]:
    """A new lock file under ``root``, locked and still in place (another role's
    ``remove_unheld`` may take and remove it between its creation and the lock), and its
    folder's path."""
    while True:
        lock_path = root / f"{uuid.uuid4().hex}{LOCK_SUFFIX}"
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            in_place = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            in_place = False
        if in_place:
            return fd, lock_path.with_suffix("")
        os.close(fd)
