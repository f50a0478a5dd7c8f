"""Scale-out: 1, 2 and 4 worker processes on one PostgreSQL job table.

``python -m bench.scale_out [--quick] [--series K] [--slices N] [--workers 1,2,4] [--model FILE]``

The receiver (``serve --roles receive``) takes K phantom series once and settles them
into K queued jobs.  Each worker count then gets a copy of that database (``CREATE
DATABASE ... TEMPLATE``) and a hard-linked copy of the spool, and starts its
``denoise-node work`` processes; the jobs are held (``run_after``) until every worker
has started.  A job is processed when it reaches ``sending`` (no sender runs).
Jobs/minute is K over the time from the first claim to the last hand-over, both from
the job events, so process start-up is not counted.  The model is a 5 x 5 mean filter
unless --model says otherwise, so the figure is the node's (read, decode, encode,
write, job table), not the CNN's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import update

from bench import common
from devtools.node_process import NodeProcess
from node import db
from node.jobs import JobQueries, JobState, WorkerRegistry
from node.jobs.tables import Job

TIMEOUT = 3600.0
#: Jobs wait (run_after) until every worker process of a run has started.
HELD = datetime(9999, 1, 1)


@dataclass
class Outcome:
    """What the job events say about one run."""

    span_seconds: float
    per_worker: list[int]
    not_once: int


def receive(folder: Path, url: str, paths: list[Path], jobs: int) -> None:
    """Spool every series through the node's receiver and wait for ``jobs`` queued jobs."""
    with common.node_process(folder, url, "receive", "receiver", settle_seconds=1.0) as node:
        common.progress(f"receiving {len(paths)} instances of {jobs} series")
        common.storescu(node.port, paths, "DENOISE")
        node.wait_for(
            lambda: node.queries.state_counts().get(JobState.QUEUED, 0) == jobs,
            TIMEOUT,
            f"{jobs} queued jobs",
        )
        node.stop()
    hold_jobs(url, HELD)


def hold_jobs(url: str, until: datetime | None) -> None:
    """Make every job claimable only after ``until`` (None: now)."""
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(update(Job).values(run_after=until))
    finally:
        engine.dispose()


def run_workers(
    folder: Path, template: str, count: int, jobs: int, model: Path
) -> tuple[Outcome, list[float | None]]:
    """``count`` worker processes on a copy of the queue; what happened and their peak RSS."""
    run = folder / f"workers-{count}"
    shutil.copytree(folder / "state" / "spool", run / "state" / "spool", copy_function=os.link)
    with common.database("postgresql", run, template=template) as url, ExitStack() as stack:
        workers: list[NodeProcess] = [
            stack.enter_context(
                common.node_process(run, url, "work", f"worker-{i}", model_path=str(model))
            )
            for i in range(count)
        ]
        queries = workers[0].queries
        workers[0].wait_for(
            lambda: ready(workers[0].registry) == count, TIMEOUT, f"{count} workers to start"
        )
        hold_jobs(url, None)
        workers[0].wait_for(
            lambda: processed(queries, jobs), TIMEOUT, f"{jobs} jobs denoised by {count} workers"
        )
        rss = [common.peak_rss_mib(w.process.pid) for w in workers if w.process is not None]
        for worker in workers:
            worker.stop()
        return analyse(queries), rss


def ready(registry: WorkerRegistry) -> int:
    """Worker loops running on this job table."""
    return sum(1 for w in registry.workers() if w.name.endswith("/work") and not w.stopped_at)


def processed(queries: JobQueries, jobs: int) -> bool:
    """True when every job was denoised; CannotRun when one failed."""
    counts = queries.state_counts()
    if counts.get(JobState.FAILED):
        failed = queries.list_jobs(states=[JobState.FAILED], limit=1)[0]
        raise common.CannotRun(f"job {failed.id} failed: {failed.last_error}")
    return counts.get(JobState.SENDING, 0) == jobs


def analyse(queries: JobQueries) -> Outcome:
    """Span, jobs per worker, and jobs not claimed and handed over exactly once by one worker."""
    first: datetime | None = None
    last: datetime | None = None
    per_worker: Counter[str] = Counter()
    not_once = 0
    for job in queries.list_jobs(limit=100_000):
        events = queries.job_events(job.id)
        claims = [e for e in events if (e.from_state, e.to_state) == ("queued", "running")]
        handovers = [e for e in events if (e.from_state, e.to_state) == ("running", "sending")]
        if len(claims) != 1 or len(handovers) != 1 or claims[0].actor != handovers[0].actor:
            not_once += 1
        for claim in claims:
            per_worker[claim.actor] += 1
            first = min(first or claim.at, claim.at)
        for handover in handovers:
            last = max(last or handover.at, handover.at)
    if first is None or last is None:
        raise common.CannotRun("no job was claimed and handed over")
    span = (last - first).total_seconds()
    return Outcome(span, sorted(per_worker.values(), reverse=True), not_once)


def benchmark(args: argparse.Namespace) -> None:
    model = args.model or common.mean_filter_model()
    count = common.slices(args)
    jobs = args.series or (2 if args.quick else 16)
    counts = [int(n) for n in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    common.note(f"model: {common.describe_model(model)}")
    common.note(f"{jobs} series of {count} slices of {common.SIZE}x{common.SIZE}, on PostgreSQL")
    series = [common.phantom_series(count, seed=100 + k) for k in range(jobs)]
    paths = [path for one in series for path in one]

    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary,
        common.database("postgresql", Path(temporary)) as template,
    ):
        folder = Path(temporary)
        receive(folder, template, paths, jobs)
        base: float | None = None
        for workers in counts:
            common.progress(f"{workers} worker(s) on {jobs} queued jobs")
            outcome, rss = run_workers(folder, template, workers, jobs, model)
            rate = jobs / outcome.span_seconds * 60
            base = base or (rate if workers == 1 else None)
            known = [value for value in rss if value is not None]
            rows.append(
                [
                    workers,
                    jobs,
                    outcome.span_seconds,
                    rate,
                    rate / base if base else None,
                    jobs * count / outcome.span_seconds,
                    "+".join(map(str, outcome.per_worker)),
                    outcome.not_once,
                    max(known) if known else None,
                ]
            )
            common.progress(f"  {rate:.1f} jobs/min")
    common.print_table(
        f"Scale-out: worker processes on one PostgreSQL job table, {os.cpu_count()} cores",
        [
            "workers",
            "jobs",
            "seconds",
            "jobs/min",
            "x 1 worker",
            "slices/s",
            "jobs per worker",
            "jobs not taken exactly once",
            "peak RSS MiB per worker",
        ],
        rows,
    )
    print()
    common.note(
        "'jobs not taken exactly once': jobs without exactly one queued->running claim and "
        "one running->sending hand-over by the same worker (0 means no job was taken twice)"
    )
    common.note("workers beyond the number of cores share them: expect no gain past that")


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(
        __doc__.splitlines()[0],
        full_slices=50,
        model_help="ONNX model (default: a 5x5 mean filter, to measure the node, not the CNN)",
    )
    options.add_argument("--series", type=int, help="queued series (default 16, 2 with --quick)")
    options.add_argument("--workers", help="worker counts (default 1,2,4; 1,2 with --quick)")
    return common.run("Scale-out benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
