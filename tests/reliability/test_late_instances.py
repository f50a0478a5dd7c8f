"""A series that grows after it settled: each late burst is denoised once, sent once.

The node runs as its own process; DCMTK storescu sends the series in bursts, each a
little longer after the last than the quiet period, so every burst settles into a new
job.  The PACS is DCMTK storescp writing every instance it receives to a file of its
own (``+uf``), so a test can count how often each derived instance reached it.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devtools.node_process import NodeProcess, echo
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.jobs import FINAL_STATES, JobState
from tests.fixtures.dicom import storescu
from tests.reliability.checks import series_jobs, series_uid, wait_series_done, wait_until

SLICES, BURSTS, SETTLE = 48, 4, 1.0


@pytest.fixture
def counting_pacs(tmp_path: Path) -> Iterator[tuple[dict, Path]]:
    """A storescp that keeps every received instance as a file of its own."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [dcmtk_tool("storescp"), "-aet", "PACS", "-od", str(folder), "+uf", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: echo(port, "PACS"), 30, "storescp to listen", poll=0.2)
        yield {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}, folder
    finally:
        process.terminate()
        process.wait(10)


def denoised_slices(node: NodeProcess, job_ids: set[int]) -> int:
    """Slices the worker denoised for these jobs: its one outcome line per job, from the log."""
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    return sum(
        line["slices"]
        for line in lines
        if line.get("job_id") in job_ids and str(line.get("outcome", "")).startswith("denoised")
    )


def test_a_series_sent_in_bursts_is_denoised_about_once_and_sent_at_most_twice(
    node_factory, counting_pacs: tuple[dict, Path], tmp_path: Path
) -> None:
    destinations, received = counting_pacs
    node = node_factory(destinations=destinations, settle_seconds=SETTLE).start()
    paths = write_phantom_series(tmp_path / "series", PhantomSpec(slices=SLICES, size=64, seed=7))
    size = SLICES // BURSTS
    for burst in range(BURSTS):
        if burst:
            time.sleep(1.5 * SETTLE)
        assert storescu(node.port, paths[burst * size : (burst + 1) * size]) == [0] * size
    uid = series_uid(paths[0])
    newest = wait_series_done(node, uid, SLICES)
    assert newest.state == JobState.DONE, newest.last_error
    node.wait_for(
        lambda: all(job.state in FINAL_STATES for job in series_jobs(node, uid)), 60, "final jobs"
    )
    jobs = series_jobs(node, uid)
    arrivals = Counter(
        str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        for path in received.iterdir()
    )
    denoised = denoised_slices(node, {job.id for job in jobs})
    print(
        f"\n{SLICES} slices in {BURSTS} bursts: {len(jobs)} jobs "
        f"({Counter(job.state for job in jobs)}), {denoised} slices denoised, "
        f"{sum(arrivals.values())} C-STOREs to the PACS, at most {max(arrivals.values())} each"
    )
    assert len(arrivals) == SLICES, "the whole derived series reached the PACS"
    assert max(arrivals.values()) <= 2
    assert denoised <= 1.5 * SLICES
