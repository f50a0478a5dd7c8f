"""Faults outside the node: the PACS down, the database down, the spool disk full, a bad model.

Each fault is real: Orthanc's process is stopped, a PostgreSQL cluster of the test's own
is stopped with ``pg_ctlcluster``, the spool lives on a small tmpfs that the test fills,
the model file is not an ONNX model.  The node must refuse what it cannot keep, wait
for what it cannot reach, and carry on by itself once the fault is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.node_process import echo
from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import free_port
from node import db
from node.jobs import JobState
from node.jobs.states import EventKind
from node.spool import TMP_SUFFIX
from tests.fixtures.dicom import storescu
from tests.reliability.checks import (
    assert_in_spool,
    assert_series_delivered_once,
    count_instances,
    pacs,
    series_jobs,
    series_uid,
    wait_series_done,
    wait_until,
)

#: the sqlite backend only: these tests bring their own faults, not a second backend
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def series(folder: Path, seed: int, slices: int = 6, size: int = 128) -> list[Path]:
    spec = PhantomSpec(slices=slices, size=size, seed=seed, series_description=f"Fault {seed}")
    return write_phantom_series(folder / f"series-{seed}", spec)


def postponements(node, job_id: int) -> list[float]:
    """The delays (s) of the job's send postponements, from its timeline."""
    return [
        float(match.group(1))
        for event in node.queries.job_events(job_id)
        if event.kind == EventKind.POSTPONED
        and (match := re.match(r"send postponed (\d+) s", event.message))
    ]


@SQLITE
def test_pacs_down_jobs_wait_with_backoff_and_finish_when_it_returns(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str
) -> None:
    node = node_factory(destinations=pacs(orthanc), send_retry_seconds=1.0).start()
    orthanc.stop()
    paths = series(tmp_path, seed=21)
    assert storescu(node.port, paths) == [0] * len(paths)
    uid = series_uid(paths[0])
    node.wait_for(
        lambda: (
            bool(series_jobs(node, uid))
            and len(postponements(node, series_jobs(node, uid)[0].id)) >= 3
        ),
        120,
        "three postponements",
    )
    (job,) = series_jobs(node, uid)
    delays = postponements(node, job.id)
    assert job.state == JobState.SENDING and "could not be reached" in job.last_error
    assert delays == sorted(delays) and delays[-1] > delays[0], f"no backoff: {delays}"

    orthanc.start()  # same ports, same storage: the PACS is back
    wait_series_done(node, uid, len(paths))
    assert_series_delivered_once(node, orthanc, uid, len(paths))
    assert orthanc.count_instances() == len(paths)


@dataclass
class Cluster:
    """A PostgreSQL cluster of the test's own, which it may stop and start at will."""

    name: str
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, action: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "15", self.name, action], check=True, capture_output=True, timeout=120
        )


@pytest.fixture
def spare_postgres() -> Iterator[Cluster]:
    """``pg_createcluster`` on a free port with trust auth, started; dropped at the end."""
    if shutil.which("pg_createcluster") is None or os.geteuid() != 0:
        pytest.skip("needs root and Debian's pg_createcluster to run a PostgreSQL of its own")
    cluster = Cluster(f"denoisetest{uuid.uuid4().hex[:8]}", free_port())
    subprocess.run(
        ["pg_createcluster", "15", cluster.name, "-p", str(cluster.port)]
        + ["--", "--auth-host=trust", "--auth-local=trust"],
        check=True,
        capture_output=True,
        timeout=180,
    )
    try:
        cluster.ctl("start")
        db.upgrade(cluster.url)
        yield cluster
    finally:
        subprocess.run(
            ["pg_dropcluster", "--stop", "15", cluster.name], capture_output=True, timeout=120
        )


@SQLITE
@pytest.mark.postgres
def test_database_down_receiver_refuses_and_the_roles_resume(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str, spare_postgres: Cluster
) -> None:
    node = node_factory(destinations=pacs(orthanc), database_url=spare_postgres.url).start()

    # Down before anything arrives: every instance is refused with 0xA7xx.  PostgreSQL's
    # statements run before a copy is put in place, so the refused instances leave none.
    spare_postgres.ctl("stop")
    first = series(tmp_path, seed=31)
    statuses = storescu(node.port, first)
    assert len(statuses) == len(first)
    assert all(0xA700 <= status <= 0xA7FF for status in statuses), [hex(s) for s in statuses]
    assert echo(node.port, "DENOISE"), "the receiver must keep answering during the outage"
    spool = node.state_dir / "spool"
    assert not [p for p in spool.rglob("*") if p.is_file()], "a refused instance left a file"

    # Back: the scanner's retry succeeds, and the series goes all the way.
    spare_postgres.ctl("start")
    assert storescu(node.port, first) == [0] * len(first)
    wait_series_done(node, series_uid(first[0]), len(first))
    assert_series_delivered_once(node, orthanc, series_uid(first[0]), len(first))

    # Down while the settler, worker and sender have a series in hand: they wait it out.
    second = series(tmp_path, seed=32, slices=24)
    assert storescu(node.port, second) == [0] * len(second)
    uid = series_uid(second[0])
    node.wait_for(lambda: bool(series_jobs(node, uid)), 60, "the second series to settle")
    spare_postgres.ctl("stop")
    wait_until(
        lambda: node.log_text().count("job table unreachable") >= 3, 60, "the roles to notice"
    )
    spare_postgres.ctl("start")
    wait_series_done(node, uid, len(second))
    assert node.process is not None and node.process.poll() is None, "a role died"
    assert_series_delivered_once(node, orthanc, uid, len(second))
    assert_in_spool(node, first + second)
    assert orthanc.count_instances() == len(first) + len(second)


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of the test's own (skips where mounting is not permitted)."""
    mountpoint = tmp_path / "small-spool"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Write a filler file until only about ``leave_bytes`` are free (or ENOSPC)."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as handle:
        remaining = max(0, free - leave_bytes)
        try:
            while remaining > 0:
                chunk = min(remaining, 1 << 20)
                handle.write(b"\0" * chunk)
                remaining -= chunk
            handle.flush()
        except OSError:
            pass  # a full disk is what we wanted
    return filler


@SQLITE
@pytest.mark.parametrize(
    ("watermark_mb", "leave_bytes"),
    [pytest.param(0, 0, id="disk-full"), pytest.param(2, 1 << 20, id="below-watermark")],
)
def test_spool_full_receiver_answers_out_of_resources_and_recovers(
    node_factory,
    orthanc: OrthancServer,
    tmp_path: Path,
    db_url: str,
    small_filesystem: Path,
    watermark_mb: int,
    leave_bytes: int,
) -> None:
    node = node_factory(
        destinations=pacs(orthanc), spool_dir=str(small_filesystem), spool_min_free_mb=watermark_mb
    ).start()
    filler = fill(small_filesystem, leave_bytes)
    paths = series(tmp_path, seed=41)
    statuses = storescu(node.port, paths)
    assert len(statuses) == len(paths)
    assert all(0xA700 <= status <= 0xA7FF for status in statuses), [hex(s) for s in statuses]
    assert count_instances(node) == 0
    assert not list(small_filesystem.rglob(f"*{TMP_SUFFIX}")), "a partial file was left"
    assert echo(node.port, "DENOISE")

    filler.unlink()  # space returns: no restart, the next association is accepted
    assert storescu(node.port, paths) == [0] * len(paths)
    wait_series_done(node, series_uid(paths[0]), len(paths))
    assert_series_delivered_once(node, orthanc, series_uid(paths[0]), len(paths))
    assert all(
        path.is_relative_to(small_filesystem)
        for path in (small_filesystem / "incoming").rglob("*.dcm")
    )


@SQLITE
def test_watermark_refuses_on_any_filesystem(node_factory, tmp_path: Path, db_url: str) -> None:
    """The watermark path DECISIONS.md names, where a test cannot mount a filesystem."""
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    node = node_factory(spool_min_free_mb=free_mb + 10_000).start()
    paths = series(tmp_path, seed=42, slices=3)
    assert storescu(node.port, paths) == [0xA700] * len(paths)
    assert count_instances(node) == 0
    assert "below the" in node.log_text() and "spool_min_free_mb" in node.log_text()


@SQLITE
def test_corrupt_model_fails_jobs_clearly_and_receiving_goes_on(
    node_factory, tmp_path: Path, db_url: str, broken_model: Path
) -> None:
    node = node_factory(model_path=str(broken_model), max_attempts=2, retry_seconds=0.5).start()
    first = series(tmp_path, seed=51)
    assert storescu(node.port, first) == [0] * len(first)
    job = wait_series_done(node, series_uid(first[0]), len(first))
    assert job.state == JobState.FAILED and job.attempts == 2
    assert "not a usable ONNX model" in job.last_error and str(broken_model) in job.last_error

    second = series(tmp_path, seed=52)
    assert storescu(node.port, second) == [0] * len(second)
    assert_in_spool(node, first + second)
    assert node.process is not None and node.process.poll() is None
