"""Where the receiver's time goes: each stage of the C-STORE handler, and CPU per instance.

``python -m bench.receiver_costs [--quick] [--slices N] [--senders 8] [--backend postgresql]``

The node's receiver runs in this process (``Receiver`` on a fresh job table, SQLite or
PostgreSQL, and spool, durability on) so that its stages can be timed: the C-STORE handler
(``Receiver._store``), the file meta it adds, ``storing.accept`` and the functions it
calls are wrapped in ``time.perf_counter`` pairs, as are ``os.fsync`` calls.  storescu
sends the phantom series in one association; the wall time per instance is split into
the handler's stages and the rest (pynetdicom receiving the data set into memory and
answering).  Then the process CPU time per instance (``getrusage``)
with one association and with ``--senders`` at once, beside the durable floor of
``bench.ingest`` (write once, fsync file and folder, one row) with one association.
Last, the CPU the receiver spends on associations that are open and idle (``--idle``
of them, opened by another process, which sends nothing for 5 s).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from bench import common
from bench.ingest import durable_floor, storescu_parallel
from devtools.tools import free_port
from node import receiver as receiver_module
from node import storing
from node.config import Settings
from node.context import NodeContext
from node.receiver import Receiver

#: The handler's stages, in the order ``storing.accept`` runs them.
STAGES = (
    "_begin_writing",
    "read_header",
    "checked_uids",
    "check_room",
    "_check_supported",
    "check_pixel_data",
    "_into_spool",
    "_record",
)


class StageClock:
    """Seconds and calls per wrapped function, while installed."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def wrap(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        return timed

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = {name: getattr(storing, name) for name in (*STAGES, "accept")}
        fsync, store, meta = os.fsync, Receiver._store, receiver_module.file_bytes
        try:
            for name, function in originals.items():
                setattr(storing, name, self.wrap(name, function))
            os.fsync = self.wrap("os.fsync (file and folder)", fsync)
            Receiver._store = self.wrap("handler", store)  # type: ignore[method-assign]
            receiver_module.file_bytes = self.wrap("file_bytes", meta)
            yield
        finally:
            for name, function in originals.items():
                setattr(storing, name, function)
            os.fsync = fsync
            Receiver._store = store  # type: ignore[method-assign]
            receiver_module.file_bytes = meta


@contextmanager
def receiver(folder: Path, backend: str) -> Iterator[Receiver]:
    """The node's receiver in this process, on a fresh job table of ``backend`` and spool."""
    with common.database(backend, folder) as url:
        settings = Settings(
            state_dir=folder / "state",
            database_url=url,
            port=free_port(),
            spool_min_free_mb=0,
            settle_seconds=3600,
        )
        ctx = NodeContext.open(settings)
        started = Receiver(ctx)
        started.start()
        try:
            yield started
        finally:
            started.stop()
            ctx.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage_table(paths: Sequence[Path], backend: str) -> None:
    clock = StageClock()
    with (
        tempfile.TemporaryDirectory(prefix="bench-costs-") as folder,
        receiver(Path(folder), backend) as r,
        clock.installed(),
    ):
        seconds = common.storescu(r.port, paths, r.ctx.settings.ae_title)
    count = len(paths)
    spent = {label: value / count * 1000 for label, value in clock.seconds.items()}
    rows: list[list[object]] = [["whole C-STORE, wall", seconds / count * 1000, ""]]
    rows.append(["  Receiver._store (the handler)", spent["handler"], clock.calls["handler"]])
    rows.append(["    file_bytes (file meta)", spent["file_bytes"], clock.calls["file_bytes"]])
    rows.append(["    storing.accept", spent["accept"], clock.calls["accept"]])
    for label in STAGES:
        rows.append([f"      {label}", spent[label], clock.calls[label]])
    rest = spent["accept"] - sum(spent[label] for label in STAGES)
    rows.append(["      SHA-256 (and the rest of accept)", rest, ""])
    fsyncs = "os.fsync (file and folder)"
    rows.append([f"    {fsyncs}, in any thread", spent[fsyncs], clock.calls[fsyncs]])
    rows.append(
        [
            "  the rest (pynetdicom receiving into memory, answering)",
            seconds / count * 1000 - spent["handler"],
            "",
        ]
    )
    common.print_table(
        f"The node's receiver, {count} slices in one association ({backend}), ms per instance",
        ["stage", "ms per instance", "calls"],
        rows,
    )


def cpu_table(paths: Sequence[Path], senders: int, backend: str) -> None:
    count = len(paths)
    rows: list[list[object]] = []
    for associations in (1, senders):
        with (
            tempfile.TemporaryDirectory(prefix="bench-costs-") as folder,
            receiver(Path(folder), backend) as r,
        ):
            title = r.ctx.settings.ae_title
            before = cpu_seconds()
            if associations == 1:
                seconds = common.storescu(r.port, paths, title)
            else:
                seconds = storescu_parallel(r.port, paths, title, associations)
            spent = cpu_seconds() - before
        rows.append([f"node, {associations} association(s)", count / seconds, spent / count * 1000])
    with (
        tempfile.TemporaryDirectory(prefix="bench-costs-") as folder,
        durable_floor(backend)(Path(folder)) as peer,
    ):
        before = cpu_seconds()
        seconds = common.storescu(peer.port, paths, peer.ae_title)
        spent = cpu_seconds() - before
    floor = f"durable floor ({backend}), 1 association"
    rows.append([floor, count / seconds, spent / count * 1000])
    common.print_table(
        f"CPU time of the receiving process, {count} slices",
        ["receiver", "slices/s", "CPU ms per instance"],
        rows,
    )


#: Seconds the idle associations stay open while the receiver's CPU time is counted.
IDLE_SECONDS = 5.0


def hold_idle(port: int, count: int, opened: EventType, done: EventType) -> None:
    """Open ``count`` associations to the receiver and send nothing until ``done`` (a
    ``multiprocessing`` target: this process's own polling is not the receiver's)."""
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="DENOISE") for _ in range(count)]
    opened.set()
    done.wait(60)
    for assoc in held:
        assoc.release()


def idle_table(count: int, backend: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    rows: list[list[object]] = []
    for held in (0, count):
        with (
            tempfile.TemporaryDirectory(prefix="bench-costs-") as folder,
            receiver(Path(folder), backend) as r,
        ):
            opened, done = spawn.Event(), spawn.Event()
            holder = spawn.Process(target=hold_idle, args=(r.port, held, opened, done))
            holder.start()
            if not opened.wait(60):
                raise common.CannotRun("the idle associations did not open")
            time.sleep(0.5)  # the receiver's side sees them all
            before = cpu_seconds()
            time.sleep(IDLE_SECONDS)
            spent = cpu_seconds() - before
            done.set()
            holder.join(60)
        rows.append([f"{held} idle association(s)", spent / IDLE_SECONDS * 100])
    common.print_table(
        f"CPU time of the receiving process with associations open and idle, {IDLE_SECONDS:.0f} s",
        ["receiver", "% of one core"],
        rows,
    )


def benchmark(args: argparse.Namespace) -> None:
    paths = common.phantom_series(common.slices(args))
    stage_table(paths, args.backend)
    cpu_table(paths, args.senders, args.backend)
    idle_table(args.idle, args.backend)


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--senders", type=int, default=8, help="concurrent associations (8)")
    options.add_argument(
        "--backend", choices=("sqlite", "postgresql"), default="sqlite", help="job table (sqlite)"
    )
    options.add_argument("--idle", type=int, default=16, help="idle associations held (16)")
    return common.run("Receiver costs", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
