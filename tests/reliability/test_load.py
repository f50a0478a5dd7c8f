"""Load: 8 scanners send 8 series of 300 slices at once; all stored once, all done, memory flat.

The slices are 128 x 128 phantoms and the model is the tiny mean filter, so the test
measures the node (receiving, settling, job table, spool, sending) within CI time;
the 512 x 512 figures with the shipped model live in ``bench/``.  The node runs as one
``serve`` process; its peak resident memory (VmHWM) is printed and held under a
generous cap, so a leak (say, a data set kept per instance) fails the test.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs import JobState
from node.jobs.tables import Instance
from tests.reliability.checks import StorescuRun, pacs, series_uid

SCANNERS = 8
SLICES = 300
SIZE = 128
MEMORY_CAP_MB = 1536


def peak_resident_mb(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.mark.load
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_eight_scanners_at_once(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str
) -> None:
    all_series = [
        write_phantom_series(
            tmp_path / f"scanner-{n}",
            PhantomSpec(slices=SLICES, size=SIZE, seed=900 + n, series_description=f"Load {n}"),
        )
        for n in range(SCANNERS)
    ]
    # The default settle time: a busy 2-core machine can pause one association for a few
    # seconds, and a shorter quiet period would (correctly) settle a partial series.
    node = node_factory(destinations=pacs(orthanc), settle_seconds=10.0).start()
    assert node.process is not None
    started = time.monotonic()
    runs = [
        StorescuRun(node.port, paths, tmp_path / f"storescu-{n}", calling_ae=f"CT{n}")
        for n, paths in enumerate(all_series)
    ]
    for run in runs:
        assert run.wait(timeout=900) == [0] * SLICES
    received = time.monotonic() - started

    jobs = node.wait_jobs_final(SCANNERS, timeout=1200)
    finished = time.monotonic() - started
    peak = peak_resident_mb(node.process.pid)
    total = SCANNERS * SLICES
    print(
        f"load: {total} instances received in {received:.0f} s, {SCANNERS} jobs done after "
        f"{finished:.0f} s; node peak resident memory (VmHWM) {peak:.0f} MiB"
    )
    assert all(job.state == JobState.DONE for job in jobs), [(j.id, j.last_error) for j in jobs]
    newest = {job.series_instance_uid: job for job in sorted(jobs, key=lambda j: j.id)}
    assert set(newest) == {series_uid(s[0]) for s in all_series}
    assert all(job.instance_count == SLICES for job in newest.values())
    print(f"load: {len(jobs) - SCANNERS} series settled early and were re-settled whole")
    with node.manager._sessions() as session:
        stored = session.scalar(select(func.count()).select_from(Instance))
        distinct = session.scalar(select(func.count(func.distinct(Instance.sop_instance_uid))))
    assert stored == distinct == total
    assert orthanc.count_instances() == total
    assert peak < MEMORY_CAP_MB, f"node peak resident memory {peak:.0f} MiB"
