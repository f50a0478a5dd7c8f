"""Ingest: storescu sends one CT series to DCMTK storescp, Orthanc and the node's receiver.

``python -m bench.ingest [--quick] [--slices N] [--repeat N]``

Each receiver starts fresh (empty folder, storage or database) for each run, and the
runs are interleaved so that background load falls on all of them alike.  Two floors are
measured beside them: a bare pynetdicom SCP that stores nothing (what the node's DICOM
library costs before the node does any work) and one fsync of a file of one slice's size
on the disk the benchmark writes to.  The node runs
as ``denoise-node serve --roles receive`` with its durability on (fsync of every file
and its folder, one job table row per instance) and a settle time so long that no job
is created during the run.  The time is storescu's, from its start to its exit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import text

from bench import common
from devtools.node_process import echo
from devtools.orthanc import OrthancServer
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.db import make_engine
from node.receiver import TRANSFER_SYNTAXES

NO_SETTLE = 86400.0
START_TIMEOUT = 30.0


@dataclass
class Peer:
    """A receiver ready for a run: where it listens, how to count what it stored."""

    port: int
    ae_title: str
    received: Callable[[], int]
    pid: int | None = None


Starter = Callable[[Path], AbstractContextManager[Peer]]


@dataclass
class Runs:
    """One receiver's runs: seconds and peak RSS of each."""

    seconds: list[float] = field(default_factory=list)
    rss_mib: list[float | None] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak(self) -> float | None:
        known = [value for value in self.rss_mib if value is not None]
        return max(known) if known else None


@contextmanager
def storescp(folder: Path) -> Iterator[Peer]:
    """DCMTK storescp writing each instance into ``folder`` (TCP_NODELAY=1)."""
    port = free_port()
    out = folder / "storescp"
    out.mkdir()
    process = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not echo(port, "STORESCP"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise common.CannotRun(f"storescp did not start on port {port}")
            time.sleep(0.1)
        yield Peer(port, "STORESCP", lambda: sum(1 for _ in out.iterdir()), process.pid)
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def orthanc(folder: Path) -> Iterator[Peer]:
    """Orthanc with fresh storage, configured as the project's tests configure it."""
    with OrthancServer(folder / "orthanc") as server:
        config = str(server.folder / "orthanc.json").encode()
        yield Peer(server.dicom_port, server.ae_title, server.count_instances, pid_of(config))


@contextmanager
def bare_pynetdicom(_folder: Path) -> Iterator[Peer]:
    """A pynetdicom C-STORE SCP in this process that answers success and keeps nothing."""
    stored = 0

    def handle_store(_event: evt.Event) -> int:
        nonlocal stored
        stored += 1
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)]
    )
    try:
        yield Peer(int(server.server_address[1]), "BARE", lambda: stored)
    finally:
        server.shutdown()


class FloorStore:
    """What durability needs and nothing more: the received bytes written once to a file,
    the file and its folder fsynced, one row inserted and committed, then success."""

    def __init__(self, url: str, out: Path) -> None:
        self.engine = make_engine(url)
        self.out = out
        self.insert = text("INSERT INTO bench_floor VALUES (:uid, :path)")

    def handle_store(self, event: evt.Event) -> int:
        path = self.out / f"{uuid.uuid4().hex}.dcm"
        with open(path, "xb") as handle:
            handle.write(event.encoded_dataset())
            handle.flush()
            os.fsync(handle.fileno())
        descriptor = os.open(self.out, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.engine.begin() as connection:
            connection.execute(self.insert, {"uid": uid, "path": path.name})
        return 0x0000

    def stored(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT count(*) FROM bench_floor").scalar_one())


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's server on a socket that other processes bind too (SO_REUSEPORT): the
    kernel spreads incoming connections over them."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def floor_server(store: FloorStore, port: int) -> ThreadedAssociationServer:
    """The floor's SCP on 127.0.0.1:``port`` (0: any), serving in a background thread."""
    ae = AE(ae_title="FLOOR")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(CTImageStorage, TRANSFER_SYNTAXES)
    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_C_STORE, store.handle_store)],
        server_class=SharedPortServer,
    )
    # As AE.start_server does for a non-blocking server; server.shutdown expects it.
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_floor(url: str, out: Path, port: int, ready: EventType, stop: EventType) -> None:
    """One more floor process on ``port`` (a ``multiprocessing`` target), until ``stop``."""
    store = FloorStore(url, out)
    server = floor_server(store, port)
    ready.set()
    stop.wait()
    server.shutdown()
    store.engine.dispose()


def durable_floor(backend: str, processes: int = 1) -> Starter:
    """A pynetdicom SCP that does only what durability needs (``FloorStore``), in this
    process and ``processes - 1`` more sharing its port.

    The job table database is a fresh one of ``backend`` with the node's engine (SQLite
    in WAL mode with ``synchronous=NORMAL``, whose lost tail after a power loss the node
    rebuilds from the spool): the best a durable pynetdicom receiver can do, and with
    several processes what it could do free of one interpreter lock.
    """

    @contextmanager
    def start(folder: Path) -> Iterator[Peer]:
        with common.database(backend, folder) as url:
            store = FloorStore(url, folder / "floor")
            store.out.mkdir()
            with store.engine.begin() as connection:
                connection.exec_driver_sql(
                    "CREATE TABLE bench_floor (sop_instance_uid VARCHAR(64) PRIMARY KEY, "
                    "path VARCHAR(64) NOT NULL)"
                )
            server = floor_server(store, 0)
            port = int(server.server_address[1])
            spawn = multiprocessing.get_context("spawn")
            stop = spawn.Event()
            others = []
            for _ in range(processes - 1):
                ready = spawn.Event()
                other = spawn.Process(target=serve_floor, args=(url, store.out, port, ready, stop))
                other.start()
                others.append(other)
                if not ready.wait(START_TIMEOUT):
                    raise common.CannotRun("a durable floor process did not start")
            try:
                yield Peer(port, "FLOOR", store.stored)
            finally:
                stop.set()
                for other in others:
                    other.join(START_TIMEOUT)
                server.shutdown()
                store.engine.dispose()

    return start


def fsync_ms(folder: Path, size: int, repeat: int = 50) -> float:
    """Median milliseconds to write and fsync one file of ``size`` bytes in ``folder``."""
    data = os.urandom(size)
    times = []
    for i in range(repeat):
        path = folder / f"fsync-{i}"
        with open(path, "wb") as handle:
            handle.write(data)
            started = time.perf_counter()
            handle.flush()
            os.fsync(handle.fileno())
            times.append(time.perf_counter() - started)
        path.unlink()
    return statistics.median(times) * 1000


def pid_of(argument: bytes) -> int | None:
    """The process that has ``argument`` on its command line (Orthanc's configuration file)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and argument in (entry / "cmdline").read_bytes().split(b"\0"):
                return int(entry.name)
        except OSError:
            continue
    return None


def node(backend: str, receiver_processes: int = 1) -> Starter:
    """The node's receiver on a fresh job table of ``backend`` (sqlite or postgresql), in
    ``receiver_processes`` processes on its port."""

    @contextmanager
    def start(folder: Path) -> Iterator[Peer]:
        with (
            common.database(backend, folder) as url,
            common.node_process(
                folder,
                url,
                "receive",
                settle_seconds=NO_SETTLE,
                receiver_processes=receiver_processes,
            ) as process,
        ):
            process.wait_for(lambda: "running roles" in process.log_text(), START_TIMEOUT)
            assert process.process is not None
            yield Peer(
                process.port,
                "DENOISE",
                lambda: process.queries.instance_totals()[0],
                process.process.pid,
            )
            process.stop()

    return start


def measure(start: Starter, paths: Sequence[Path]) -> tuple[float, float | None]:
    """Send the series to a fresh receiver; the seconds and the receiver's peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder, start(Path(folder)) as peer:
        seconds = common.storescu(peer.port, paths, peer.ae_title)
        stored = peer.received()
        if stored != len(paths):
            raise common.CannotRun(f"{peer.ae_title} stored {stored} of {len(paths)} instances")
        return seconds, common.peak_rss_mib(peer.pid) if peer.pid else None


def storescu_parallel(port: int, paths: Sequence[Path], called_ae: str, senders: int) -> float:
    """``senders`` storescu processes at once from 127.0.0.1, each sending every
    ``senders``-th slice in its own association; the seconds until the last one exits."""
    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(
            pool.map(
                lambda share: common.storescu(port, paths[share::senders], called_ae),
                range(senders),
            )
        )
    return time.perf_counter() - started


def measure_parallel(start: Starter, paths: Sequence[Path], senders: int) -> float:
    """Seconds for ``senders`` concurrent associations to deliver the series."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as folder, start(Path(folder)) as peer:
        seconds = storescu_parallel(peer.port, paths, peer.ae_title, senders)
        stored = peer.received()
        if stored != len(paths):
            raise common.CannotRun(f"{peer.ae_title} stored {stored} of {len(paths)} instances")
        return seconds


def benchmark(args: argparse.Namespace) -> None:
    count = common.slices(args)
    repeat = args.repeat or (1 if args.quick else 3)
    paths = common.phantom_series(count)
    size = common.megabytes(paths)
    receivers: dict[str, Starter] = {
        "DCMTK storescp": storescp,
        "Orthanc": orthanc,
        "bare pynetdicom SCP (stores nothing)": bare_pynetdicom,
        "durable floor, SQLite": durable_floor("sqlite"),
        "durable floor, PostgreSQL": durable_floor("postgresql"),
        "node, SQLite": node("sqlite"),
        "node, PostgreSQL": node("postgresql"),
    }
    runs = {name: Runs() for name in receivers}
    for attempt in range(1, repeat + 1):
        for name, start in receivers.items():
            common.progress(f"run {attempt}/{repeat}: {count} slices to {name}")
            seconds, rss = measure(start, paths)
            runs[name].seconds.append(seconds)
            runs[name].rss_mib.append(rss)
            common.progress(f"  {seconds:.2f} s, {count / seconds:.1f} slices/s")

    storescp_s = runs["DCMTK storescp"].median
    orthanc_s = runs["Orthanc"].median
    rows = [
        [
            name,
            count / r.median,
            size / r.median,
            storescp_s / r.median,
            orthanc_s / r.median,
            r.peak,
            ", ".join(common.cell(s) for s in r.seconds),
        ]
        for name, r in runs.items()
    ]
    common.print_table(
        f"Ingest: {count} slices of {common.SIZE}x{common.SIZE} ({size:.0f} MB) by storescu, "
        f"median of {repeat}",
        ["receiver", "slices/s", "MB/s", "x storescp", "x Orthanc", "peak RSS MiB", "runs (s)"],
        rows,
    )
    print()
    with tempfile.TemporaryDirectory(prefix="bench-fsync-") as folder:
        one_fsync = fsync_ms(Path(folder), round(size * 1e6 / count))
    budget = 1000 / (0.7 * count / storescp_s)
    common.note(
        f"one fsync of a {size / count:.2f} MB file on this disk: {one_fsync:.2f} ms (median); "
        f"0.7x storescp leaves {budget:.2f} ms per instance for everything"
    )
    for backend in ("SQLite", "PostgreSQL"):
        floor_s = runs[f"durable floor, {backend}"].median
        node_s = runs[f"node, {backend}"].median
        common.note(
            f"node, {backend}: {floor_s / node_s:.2f}x the durable floor on {backend} "
            f"(target >= 0.9x), {orthanc_s / node_s:.2f}x Orthanc (target >= 0.8x)"
        )
    common.note(
        "storescp and Orthanc do not fsync; the node and the durable floor fsync each file "
        "and its folder and commit one row per instance before they answer"
    )
    if args.senders > 1:
        print()
        concurrent(paths, args.senders, repeat)


def concurrent(paths: Sequence[Path], senders: int, repeat: int) -> None:
    """The same series split over ``senders`` concurrent associations from one address."""
    receivers: dict[str, Starter] = {
        "Orthanc": orthanc,
        "durable floor, SQLite": durable_floor("sqlite"),
        "durable floor, SQLite, 2 processes on one port": durable_floor("sqlite", 2),
        "durable floor, SQLite, 4 processes on one port": durable_floor("sqlite", 4),
        "node, SQLite": node("sqlite"),
        "node, SQLite, 2 receiver processes": node("sqlite", 2),
        "node, SQLite, 4 receiver processes": node("sqlite", 4),
        "node, PostgreSQL": node("postgresql"),
        "node, PostgreSQL, 2 receiver processes": node("postgresql", 2),
    }
    runs: dict[str, list[float]] = {name: [] for name in receivers}
    for attempt in range(1, repeat + 1):
        for name, start in receivers.items():
            common.progress(f"run {attempt}/{repeat}: {senders} associations to {name}")
            runs[name].append(measure_parallel(start, paths, senders))
            common.progress(f"  {runs[name][-1]:.2f} s")
    orthanc_s = statistics.median(runs["Orthanc"])
    rows = [
        [
            name,
            len(paths) / statistics.median(seconds),
            orthanc_s / statistics.median(seconds),
            ", ".join(common.cell(s) for s in seconds),
        ]
        for name, seconds in runs.items()
    ]
    common.print_table(
        f"Ingest: the same {len(paths)} slices by {senders} concurrent storescu associations "
        f"from 127.0.0.1, median of {repeat}",
        ["receiver", "slices/s (all senders)", "x Orthanc", "runs (s)"],
        rows,
    )
    common.note("target: the node >= 1.0x Orthanc")


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--repeat", type=int, help="runs per receiver (default 3, 1 with --quick)")
    options.add_argument(
        "--senders",
        type=int,
        default=8,
        help="concurrent associations of the second table (default 8; 1 leaves it out)",
    )
    return common.run("Ingest benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
