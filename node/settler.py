"""Series settling: a series with no new instance for ``settle_seconds`` becomes one job.

DICOM has no "end of series" message, so quiet time is the only signal that a
scanner has finished sending.  A late instance makes the series settle again into a
new job for the whole series; ``JobManager.create_job`` refuses a series that grew
while it was being decided, so it is simply decided again at the next poll.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from node.context import NodeContext
from node.db import utcnow
from node.jobs.manager import NewJob
from node.rules import select_series

log = logging.getLogger(__name__)


class SeriesSettler:
    """Turns quiet series into queued or skipped jobs; ``node.service`` polls ``run_once``."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def run_once(self) -> list[int]:
        """Create a job for every series that has been quiet long enough; returns their ids."""
        settings = self.ctx.settings
        manager, queries = self.ctx.manager, self.ctx.queries
        quiet_since = utcnow() - timedelta(seconds=settings.settle_seconds)
        created = []
        for series in queries.settled_series(quiet_since):
            instances = queries.series_instances(series.series_instance_uid)
            decision = select_series(
                settings, [instance.header for instance in instances], series.calling_ae_title
            )
            job_id = manager.create_job(
                NewJob(
                    series_instance_uid=series.series_instance_uid,
                    study_instance_uid=series.study_instance_uid,
                    calling_ae_title=series.calling_ae_title,
                    settled_through=series.last_received_at,
                    instance_count=len(instances),
                    rule=decision.rule,
                    strength=decision.strength,
                    destinations=decision.destinations,
                    skip_reason=decision.skip_reason,
                    priority=decision.priority,
                )
            )
            if job_id is None:
                continue  # an instance arrived meanwhile: the series settles again later
            extra = {
                "job_id": job_id,
                "series_uid": series.series_instance_uid,
                "calling_ae": series.calling_ae_title,
            }
            if decision.skip_reason:
                log.info(
                    "job %d skipped: %s (%d instances)",
                    job_id,
                    decision.skip_reason,
                    len(instances),
                    extra=extra,
                )
            else:
                log.info(
                    "job %d queued: %d instances, rule %r, strength %.2f, to %s",
                    job_id,
                    len(instances),
                    decision.rule,
                    decision.strength,
                    ", ".join(decision.destinations) or "no destination",
                    extra=extra,
                )
            created.append(job_id)
        return created
