"""``denoise-node jobs forget ID`` and the dashboard's Forget: a clean slate for a resend.

The rows go first (``JobManager.forget_job``), then the files no row names any more, so a
crash in between leaves only unreferenced files, never rows without files.  Those files
are marked as the receiver marks copies no row names (``node.unrecorded``), durably,
before the rows' deletion commits (no mark, no forgetting): after such a crash the
start-up recovery leaves them (it would otherwise record a forgotten series again) and
housekeeping removes them after ``unrecorded_grace_seconds``.  Audited.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress

from node import unrecorded
from node.context import NodeContext
from node.jobs import TransitionError
from node.jobs.forgetting import ForgottenJob
from node.overview import ActionRefused, JobNotFound

log = logging.getLogger(__name__)
Command = Callable[[argparse.Namespace], int]


def forget(ctx: NodeContext, job_id: int, actor: str) -> ForgottenJob:
    """Forget a finished job; JobNotFound or ActionRefused (with the reason) otherwise."""
    from node.web.preview import drop_previews

    try:
        ctx.queries.get_job(job_id)
    except TransitionError as exc:
        raise JobNotFound(str(exc)) from exc
    try:
        forgotten = ctx.manager.forget_job(
            job_id, lambda paths: unrecorded.mark_durably(ctx.spool, paths)
        )
    except TransitionError as exc:
        raise ActionRefused(str(exc)) from exc
    except OSError as exc:
        raise ActionRefused(
            f"job {job_id} not forgotten: its spool files could not be marked first "
            f"({exc.strerror}); check the spool's disk and try again"
        ) from exc
    removed = remove_forgotten(ctx, forgotten.spool_paths)
    drop_previews(ctx.settings, job_id)
    log.warning(
        "job %s forgotten by %s: its series' rows and %d spool files removed",
        job_id,
        actor,
        removed,
        extra={
            "audit": True,
            "actor": actor,
            "action": "forget",
            "job_id": job_id,
            "series_uid": forgotten.series_instance_uid,
        },
    )
    return forgotten


def remove_forgotten(ctx: NodeContext, paths: list[str]) -> int:
    """Remove the forgotten files, then their marks; returns how many files were there."""
    removed = 0
    for path in paths:
        with suppress(FileNotFoundError):
            ctx.spool.path(path).unlink()
            removed += 1
        unrecorded.unmark(ctx.spool, path)
    return removed


def add_forget_command(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser],
    context: Callable[[argparse.Namespace], AbstractContextManager[NodeContext]],
    actor: Callable[[], str],
    refusals: Callable[[Command], Command],
) -> None:
    """Add ``jobs forget ID`` to the ``jobs`` verbs (with ``admin``'s context and refusals)."""

    def command(args: argparse.Namespace) -> int:
        with context(args) as ctx:
            forgotten = forget(ctx, args.id, actor())
        print(
            f"job {args.id} forgotten: {len(forgotten.spool_paths)} spool files; "
            "the scanner may now send the series again"
        )
        return 0

    verb = verbs.add_parser("forget", help="drop a finished job's series so a resend starts clean")
    verb.add_argument("id", type=int)
    verb.set_defaults(func=refusals(command))
