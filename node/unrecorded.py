"""Spool copies that the job table may not have recorded: a database error while recording.

``node.storing`` keeps such a copy, since a row may name it (a COMMIT whose answer was
lost), and marks it: an empty file at the same relative path under ``unrecorded/``, with
``.unrecorded`` added to its name.  The
sender was answered with a failure and sends again, so a marked copy that no row names
after ``unrecorded_grace_seconds`` holds nothing acknowledged.  Housekeeping removes it
then, not after the day-long grace of other orphans: a database outage with retries
must not fill the spool with one copy per retry.  ``jobs forget`` marks the files of the
series it forgets the same way before their rows go (``node.forget``): a crash before it
removes them leaves them to housekeeping too, and the start-up recovery, which records
unnamed files again, leaves every marked file alone.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from pathlib import Path

from node.spool import Spool

log = logging.getLogger(__name__)

UNRECORDED_FOLDER = "unrecorded"
MARK_SUFFIX = ".unrecorded"


def _marker(spool: Spool, relative: str) -> Path:
    return spool.path(f"{UNRECORDED_FOLDER}/{relative}{MARK_SUFFIX}")


def _touch(spool: Spool, relative: str) -> Path:
    """The (empty) mark of the copy at ``relative``, created with its folder."""
    marker = _marker(spool, relative)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker


def mark(spool: Spool, relative: str) -> None:
    """Mark the copy at ``relative``; without the mark it waits for the orphan sweep."""
    try:
        _touch(spool, relative)
    except OSError as exc:
        log.warning(
            "spool copy %s not marked as unrecorded (%s): the orphan sweep removes it "
            "after orphan_grace_seconds",
            relative,
            exc.strerror,
        )


def mark_durably(spool: Spool, relatives: list[str]) -> None:
    """Mark every file and make the marks durable; raises OSError: a caller that relies
    on the marks (``node.forget``) must not go on without them."""
    folders = {_touch(spool, relative).parent for relative in relatives}
    for folder in sorted(folders):
        spool.sync_folder(folder)


def is_marked(spool: Spool, relative: str) -> bool:
    return _marker(spool, relative).is_file()


def unmark(spool: Spool, relative: str) -> None:
    _marker(spool, relative).unlink(missing_ok=True)


def marked_before(spool: Spool, grace: float) -> list[str]:
    """Relative paths of the copies marked more than ``grace`` seconds ago."""
    root = spool.path(UNRECORDED_FOLDER)
    cutoff = time.time() - grace
    found = []
    for marker in root.rglob(f"*{MARK_SUFFIX}") if root.is_dir() else []:
        with suppress(FileNotFoundError):
            if marker.is_file() and not marker.is_symlink() and marker.stat().st_mtime < cutoff:
                found.append(marker.relative_to(root).as_posix().removesuffix(MARK_SUFFIX))
    return sorted(found)
