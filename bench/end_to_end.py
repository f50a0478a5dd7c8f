"""End to end: the last instance of a series arriving to the last derived instance
acknowledged by Orthanc.

``python -m bench.end_to_end [--quick] [--slices N] [--model FILE] [--settle S]``

The node runs as ``denoise-node serve --roles receive,work,send`` on SQLite with Orthanc
as its destination.  storescu sends the series; the clock starts when storescu returns
(every instance acknowledged by the node) and stops at the job's ``sending -> done``
event, written once Orthanc acknowledged every derived instance.  The job's events
split the time into the settle wait, the queue wait, denoising and sending.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from bench import common
from devtools.orthanc import OrthancServer
from node import db
from node.jobs import JobState
from node.jobs.records import EventView

TIMEOUT = 3600.0


def benchmark(args: argparse.Namespace) -> None:
    model = common.model_file(args.model)
    count = common.slices(args)
    settle = args.settle if args.settle is not None else (1.0 if args.quick else 10.0)
    paths = common.phantom_series(count)
    common.note(f"model: {common.describe_model(model)}")
    common.note(f"provider the node picks: {common.provider()}; settle_seconds {settle:g}")

    with (
        tempfile.TemporaryDirectory(prefix="bench-e2e-") as temporary,
        OrthancServer(Path(temporary) / "orthanc") as orthanc,
        common.database("sqlite", Path(temporary)) as url,
        common.node_process(
            Path(temporary),
            url,
            "receive,work,send",
            settle_seconds=settle,
            model_path=str(model),
            destinations={"pacs": pacs(orthanc)},
        ) as node,
    ):
        assert node.process is not None
        common.progress(f"sending {count} slices to the node")
        send_seconds = common.storescu(node.port, paths, "DENOISE")
        arrived = db.utcnow()
        common.progress("waiting for the derived series in Orthanc")
        (job,) = node.wait_jobs_final(1, timeout=TIMEOUT)
        rss = common.peak_rss_mib(node.process.pid)
        if job.state != JobState.DONE:
            raise common.CannotRun(f"the job ended {job.state}: {job.last_error}")
        in_orthanc = len(orthanc.series_instances(job.output_series_uid))
        if in_orthanc != count:
            raise common.CannotRun(f"Orthanc holds {in_orthanc} of {count} derived instances")
        at = first_events(node.queries.job_events(job.id))
        node.stop()

    queued, running = at[JobState.QUEUED], at[JobState.RUNNING]
    sending, done = at[JobState.SENDING], at[JobState.DONE]
    phases: list[tuple[str, datetime, datetime, bool]] = [
        ("settle wait (arrival to job queued)", arrived, queued, False),
        ("queue wait (queued to claimed)", queued, running, False),
        ("denoise (claimed to derived series in the spool)", running, sending, True),
        ("send to Orthanc (to the last acknowledgement)", sending, done, True),
        ("last instance in to last derived instance acknowledged", arrived, done, True),
        ("the same without the settle wait", queued, done, True),
    ]
    rows: list[list[object]] = [
        [f"storescu to the node ({count} slices)", send_seconds, count / send_seconds]
    ]
    for name, start, end, rate in phases:
        seconds = (end - start).total_seconds()
        rows.append([name, seconds, count / seconds if rate and seconds > 0 else None])
    common.print_table(
        f"End to end on {common.provider()}: {count} slices of {common.SIZE}x{common.SIZE}, "
        "node on SQLite, Orthanc as the PACS",
        ["phase", "seconds", "slices/s"],
        rows,
    )
    print()
    common.note(f"peak RSS of the node process (receive, work, send): {common.cell(rss)} MiB")
    common.note("job timestamps come from the job table's events (one clock: this machine's)")


def pacs(orthanc: OrthancServer) -> dict[str, object]:
    """Orthanc as the node's destination."""
    return {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}


def first_events(events: Sequence[EventView]) -> dict[str, datetime]:
    """When the job first entered each state, from its events."""
    entered: dict[str, datetime] = {}
    for event in events:
        if event.to_state and event.to_state not in entered:
            entered[event.to_state] = event.at
    missing = {JobState.QUEUED, JobState.RUNNING, JobState.SENDING, JobState.DONE} - set(entered)
    if missing:
        raise common.CannotRun(f"the job's events lack {sorted(missing)}")
    return entered


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(
        "End to end: last instance in to last derived instance acknowledged by Orthanc.",
        model_help="ONNX model (default: the shipped model)",
    )
    options.add_argument(
        "--settle", type=float, help="the node's settle_seconds (default 10, 1 with --quick)"
    )
    return common.run("End-to-end benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
