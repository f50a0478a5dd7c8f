"""At the receiver's start: record again the spool files whose rows the job table lost.

The embedded SQLite job table runs in WAL mode with ``synchronous=NORMAL``: a commit
survives the node's own crash (kill -9) but the last commits before a power loss may
not.  Every acknowledged instance was fsynced in the spool, under its generated name,
before its row was committed, so a received file that no row names is either such an
instance or one that was never acknowledged (the node died between the spool and the
row).  Both are checked again and recorded as the receiver records them; their series
settles again into a job.  A file whose SOP Instance UID is already recorded was a
duplicate whose removal was cut short, and goes as the receiver's duplicates go.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from node.context import NodeContext
from node.instance_checks import Refused, inspect
from node.jobs.intake import instance_record
from node.jobs.manager import RecordOutcome
from node.spool import INCOMING_FOLDER, file_content
from node.unrecorded import is_marked

log = logging.getLogger(__name__)

#: The walk stops after this many date folders in a row with nothing to record again.
WHOLE_FOLDERS = 2


def rerecord_unrecorded(ctx: NodeContext) -> int:
    """Record every received spool file that no row names; returns how many became rows.

    Date folders are walked newest first and the walk stops after two in a row in which
    nothing had to be recorded again: the lost commits are the newest ones, and only an
    instance received just before midnight can be committed after one of the next day.
    A start costs a listing of the newest folders, not of the whole spool.  A copy that
    a job-table error kept (``node.unrecorded``) was answered with a failure and is sent
    again: it is left to housekeeping, never recorded while housekeeping removes it.
    """
    started = time.monotonic()
    incoming = ctx.spool.root / INCOMING_FOLDER
    folders = sorted((p for p in incoming.glob("*") if p.is_dir()), reverse=True)
    senders: dict[str, tuple[str, str]] = {}
    recorded = whole = 0
    for folder in folders:
        relative_folder = folder.relative_to(ctx.spool.root).as_posix()
        named = ctx.queries.spool_paths_in_use(relative_folder)
        found = 0
        for path in sorted(folder.glob("*.dcm")):
            relative = f"{relative_folder}/{path.name}"
            if relative not in named and path.is_file() and not is_marked(ctx.spool, relative):
                found += _rerecord(ctx, path, relative, senders)
        recorded += found
        whole = 0 if found else whole + 1
        if whole == WHOLE_FOLDERS:
            break
    if recorded:
        log.warning(
            "%d received instances had lost their job-table rows (power loss?): recorded "
            "again from the spool in %.1f s",
            recorded,
            time.monotonic() - started,
            extra={"instances": recorded},
        )
    return recorded


def _rerecord(
    ctx: NodeContext, path: Path, relative: str, senders: dict[str, tuple[str, str]]
) -> int:
    """Record one file (1), or leave it to housekeeping's orphans when it fails a check or
    remove it as a duplicate (0)."""
    extra: dict[str, object] = {"spool_path": relative}
    try:
        inspected = inspect(path, None, extra)
    except Refused:
        log.warning("spool file %s no row names fails the receiver's checks: left", relative)
        return 0
    series_uid = inspected.uids["SeriesInstanceUID"]
    if series_uid not in senders:
        senders[series_uid] = _sender_of(ctx, series_uid)
    record = instance_record(inspected, relative, file_content(path), senders[series_uid])
    outcome, kept = ctx.manager.record_instance(record)
    if outcome is RecordOutcome.NEW:
        return 1
    if kept != relative:
        ctx.spool.remove(relative)
    return 0


def _sender_of(ctx: NodeContext, series_uid: str) -> tuple[str, str]:
    """The calling AE title and address of the series' recorded instances; empty when the
    whole series lost its rows (the file does not say who sent it)."""
    known = ctx.queries.series_instances(series_uid)[:1]
    return (known[0].calling_ae_title, known[0].peer_address) if known else ("", "")
