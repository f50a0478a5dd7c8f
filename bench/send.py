"""Send: the node's sender and DCMTK storescu deliver the same series to Orthanc.

``python -m bench.send [--quick] [--slices N] [--repeat N] [--dicomweb [--rtt-ms MS]]``

Each run starts a fresh Orthanc (empty storage).  storescu (``TCP_NODELAY=1``) sends the
phantom series' files in one association.  The node's sender gets the same files as the
derived series of a job in ``sending`` on a fresh SQLite job table (made by the job
table's own verbs, as a worker leaves it), and the time is that of ``Sender.run_once``,
which claims the job, opens its associations (1, 2, and the default
``associations``; each in a process of its own, and the default count once more in
threads: ``send_in_processes`` false), sends every instance, records each
acknowledgement and concludes the job.  The runs are interleaved.

``--dicomweb`` compares STOW-RS batch sizes instead: the node's sender posts the series
to Orthanc's DICOMweb plugin ``BATCHES`` instances per request (16 is the default of
``batch_instances``), relative to one instance per request; ``--rtt-ms`` puts a proxy
with that round-trip time between them (``bench.latency``), as to a remote archive.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread

from bench import common
from bench.latency import DelayProxy
from devtools.orthanc import DICOMWEB_PLUGIN, OrthancServer
from devtools.records import file_record
from node.config import Settings
from node.context import NodeContext
from node.db import utcnow
from node.destinations import Destination
from node.jobs.manager import DerivedFile, NewJob
from node.sender import Sender
from node.spool import Spool

HOLDER = "bench-worker"
BATCHES = (1, 4, 16, 48)
Sender_ = Callable[[Path, OrthancServer, Sequence[Path]], float]


def sending_job(ctx: NodeContext, paths: Sequence[Path]) -> int:
    """A job in ``sending`` whose derived series is ``paths``, copied into the spool."""
    manager = ctx.manager
    for index, path in enumerate(paths):
        relative = f"incoming/{index:05d}.dcm"
        ctx.spool.write_atomic(relative, lambda handle, p=path: handle.write(p.read_bytes()))
        manager.record_instance(file_record(path, relative, calling_ae_title="BENCH"))
    (series,) = ctx.queries.settled_series(utcnow())
    job_id = manager.create_job(
        NewJob(
            series_instance_uid=series.series_instance_uid,
            study_instance_uid=series.study_instance_uid,
            calling_ae_title=series.calling_ae_title,
            settled_through=series.last_received_at,
            instance_count=series.instance_count,
            rule="bench",
            strength=1.0,
            destinations=["pacs"],
        )
    )
    assert job_id is not None and manager.claim_next_job(HOLDER) is not None
    derived = []
    for index, path in enumerate(paths):
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        relative = Spool.derived(job_id, index)
        ctx.spool.link(f"incoming/{index:05d}.dcm", relative)
        derived.append(DerivedFile(uid, uid, None, relative))
    manager.record_derived(job_id, HOLDER, derived)
    manager.finish_denoising(job_id, HOLDER, series.series_instance_uid, "bench", "0", "bench")
    return job_id


def dicom_destination(associations: int) -> Callable[[OrthancServer], dict[str, object]]:
    """A DICOM destination sending over ``associations`` associations at once."""

    def destination(server: OrthancServer) -> dict[str, object]:
        return {
            "ae_title": server.ae_title,
            "host": server.host,
            "port": server.dicom_port,
            "associations": associations,
        }

    return destination


def stow_destination(
    batch: int, proxy: DelayProxy | None
) -> Callable[[OrthancServer], dict[str, object]]:
    """A DICOMweb destination posting ``batch`` instances per STOW-RS request (through
    ``proxy`` where given)."""

    def destination(server: OrthancServer) -> dict[str, object]:
        url = server.dicomweb_url
        if proxy is not None:
            url = proxy.target(server.host, server.http_port) + "/dicom-web"
        return {"kind": "dicomweb", "url": url, "batch_instances": batch, "batch_bytes": 1 << 30}

    return destination


def node_sender(
    destination: Callable[[OrthancServer], dict[str, object]], in_processes: bool = True
) -> Sender_:
    """The node's sender, to ``destination(server)``, its associations in processes of
    their own or (``in_processes`` false) in threads."""

    def send(folder: Path, server: OrthancServer, paths: Sequence[Path]) -> float:
        """Seconds for the node's sender to deliver the job's series to ``server``."""
        settings = Settings(
            state_dir=folder / "state",
            database_url=f"sqlite:///{folder / 'state' / 'jobs.sqlite'}",
            destinations={"pacs": destination(server)},
            spool_min_free_mb=0,
            send_in_processes=in_processes,
        )
        ctx = NodeContext.open(settings)
        try:
            job_id = sending_job(ctx, paths)
            sender = Sender(ctx)  # the role's start: association processes' fork server up
            started = time.perf_counter()
            sender.run_once()
            seconds = time.perf_counter() - started
            job = ctx.queries.get_job(job_id)
            if job.state != "done":
                raise RunFailed(f"the sender left the job {job.state}: {job.last_error}")
            return seconds
        finally:
            ctx.close()

    return send


class RunFailed(Exception):
    """One run did not deliver the series (Orthanc refused an instance, say): it is
    reported, and the other runs are timed."""


def storescu(_folder: Path, server: OrthancServer, paths: Sequence[Path]) -> float:
    return common.storescu(server.dicom_port, paths, server.ae_title)


def measure(send: Sender_, paths: Sequence[Path], dicomweb: bool) -> float:
    """Send the series into a fresh Orthanc; the seconds, checked by Orthanc's count."""
    plugins = [DICOMWEB_PLUGIN] if dicomweb else []
    with (
        tempfile.TemporaryDirectory(prefix="bench-send-") as folder,
        OrthancServer(Path(folder) / "orthanc", plugins=plugins) as server,
    ):
        seconds = send(Path(folder), server, paths)
        if server.count_instances() != len(paths):
            raise common.CannotRun(f"Orthanc holds {server.count_instances()} instances")
        return seconds


def benchmark(args: argparse.Namespace) -> None:
    if not args.rtt_ms:
        compare(args, None)
        return
    with DelayProxy(args.rtt_ms / 1000) as proxy:
        compare(args, proxy)


def compare(args: argparse.Namespace, proxy: DelayProxy | None) -> None:
    count = common.slices(args)
    repeat = args.repeat or (1 if args.quick else 3)
    paths = common.phantom_series(count)
    default = Destination.model_fields["associations"].default
    senders: dict[str, Sender_] = {"DCMTK storescu (one association)": storescu}
    for associations in sorted({1, 2, default}):
        label = f"node's sender, {associations} association(s)"
        if associations == default:
            label += " (default)"
        senders[label] = node_sender(dicom_destination(associations))
    senders[f"node's sender, {default} associations in threads (send_in_processes false)"] = (
        node_sender(dicom_destination(default), in_processes=False)
    )
    how = "by C-STORE"
    if args.dicomweb:
        senders = {
            f"STOW-RS, {n} per request": node_sender(stow_destination(n, proxy)) for n in BATCHES
        }
        how = f"by STOW-RS to its DICOMweb plugin, {args.rtt_ms:g} ms round trips"
    runs: dict[str, list[float]] = {name: [] for name in senders}
    failed: dict[str, int] = {name: 0 for name in senders}
    for attempt in range(1, repeat + 1):
        for name, send in senders.items():
            common.progress(f"run {attempt}/{repeat}: {count} slices by {name} into Orthanc")
            try:
                runs[name].append(measure(send, paths, args.dicomweb))
            except RunFailed as exc:
                failed[name] += 1
                common.progress(f"  failed, not timed: {exc}")
                continue
            common.progress(f"  {runs[name][-1]:.2f} s, {count / runs[name][-1]:.1f} slices/s")
    if not all(runs.values()):
        raise common.CannotRun(f"every run of a sender failed: {failed}")
    baseline = next(iter(senders))
    baseline_s = statistics.median(runs[baseline])
    common.print_table(
        f"Send: {count} slices of {common.SIZE}x{common.SIZE} "
        f"({common.megabytes(paths):.0f} MB) into Orthanc {how}, median of {repeat}",
        ["sender", "slices/s", f"x {baseline}", "runs (s)"],
        [
            [
                name,
                count / statistics.median(seconds),
                baseline_s / statistics.median(seconds),
                ", ".join(common.cell(s) for s in seconds)
                + (f"; {failed[name]} failed" if failed[name] else ""),
            ]
            for name, seconds in runs.items()
        ],
    )
    if not args.dicomweb:
        common.note("target: the node's sender (its default settings) >= 0.8x storescu")


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--repeat", type=int, help="runs per sender (default 3, 1 with --quick)")
    options.add_argument(
        "--dicomweb", action="store_true", help=f"STOW-RS, {BATCHES} instances per request"
    )
    options.add_argument(
        "--rtt-ms", type=float, default=0.0, help="round-trip time added to STOW-RS (default 0)"
    )
    return common.run("Send benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
