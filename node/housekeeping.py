"""Housekeeping: spool files of long-finished jobs leave the spool, each purge in the timeline."""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta

from node.context import NodeContext
from node.db import utcnow
from node.overview import format_bytes
from node.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    jobs: list[int] = field(default_factory=list)
    received_files: int = 0
    derived_files: int = 0
    bytes: int = 0


def _remove(ctx: NodeContext, paths: list[str], dry_run: bool) -> tuple[int, int]:
    """Remove spool files; returns (files, bytes) removed (or that would be)."""
    files = freed = 0
    for relative in paths:
        path = ctx.spool.path(relative)
        try:
            freed += path.stat().st_size
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
        files += 1
    return files, freed


def purge_spool(
    ctx: NodeContext, older_than_days: float, actor: str, dry_run: bool = False
) -> PurgeReport:
    """Remove spool files of jobs final for longer than the retention; never of others.

    A job's derived files go once the job is final and old; the received instances of
    its series only when every job of the series is (a late instance would need them).
    Each purge is written to the job's timeline.
    """
    from node.web.preview import drop_previews

    queries = ctx.queries
    cutoff = utcnow() - timedelta(days=older_than_days)
    report = PurgeReport()
    for job in queries.purgeable_jobs(cutoff):
        derived = [d.spool_path for d in queries.derived_instances(job.id)]
        received = []
        if queries.series_finished_before(job.series_instance_uid, cutoff):
            received = [i.spool_path for i in queries.series_instances(job.series_instance_uid)]
        derived_files, derived_bytes = _remove(ctx, derived, dry_run)
        received_files, received_bytes = _remove(ctx, received, dry_run)
        report.jobs.append(job.id)
        report.derived_files += derived_files
        report.received_files += received_files
        report.bytes += derived_bytes + received_bytes
        if dry_run:
            continue
        drop_previews(ctx.settings, job.id)
        with suppress(OSError):  # the receiver may still write into a date folder: keep those
            ctx.spool.path(Spool.derived(job.id, 0)).parent.rmdir()
        detail = (
            f"{derived_files} derived and {received_files} received files, "
            f"{format_bytes(derived_bytes + received_bytes)} (retention {older_than_days:g} days)"
        )
        ctx.manager.record_purge(job.id, actor, detail)
        log.info(
            "purged spool of job %s: %s",
            job.id,
            detail,
            extra={"audit": True, "actor": actor, "action": "purge", "job_id": job.id},
        )
    return report
