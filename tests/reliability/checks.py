"""Helpers shared by the reliability tests: what "nothing lost" means, checked the same way.

Every check reads what the node itself wrote (its job table and spool) or what the PACS
holds (Orthanc's REST API); none trusts the node's own log line for a promise.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from sqlalchemy import func, select

from devtools.node_process import NodeProcess
from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import DCMTK_ENV, dcmtk_tool
from node.jobs import JobState
from node.jobs.tables import DerivedInstance, Instance, Job, JobEvent
from node.spool import TMP_SUFFIX
from tests.fixtures.dicom import STORE_STATUS, storescu, storescu_profile


def pacs(orthanc: OrthancServer) -> dict:
    """The ``destinations`` setting that sends to ``orthanc``."""
    return {"pacs": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}}


def series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class StorescuRun:
    """DCMTK storescu running in the background, so a test can kill the node meanwhile."""

    def __init__(self, port: int, paths: list[Path], folder: Path, calling_ae: str = "SCANNER"):
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = paths
        self.output = folder / "storescu.log"
        command = [dcmtk_tool("storescu"), "-d", "--no-halt", "-aet", calling_ae]
        command += ["-xf", str(storescu_profile(folder)), "CT", "127.0.0.1", str(port)]
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [*command, *map(str, paths)], stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV
            )

    def wait(self, timeout: float = 300.0) -> list[int]:
        """The C-STORE statuses storescu received, in the order of ``paths``."""
        self.process.wait(timeout)
        return [int(code, 16) for code in STORE_STATUS.findall(self.output.read_text())]

    def acknowledged(self, timeout: float = 300.0) -> list[Path]:
        """The files storescu saw answered with success: the node now owns them."""
        statuses = self.wait(timeout)
        return [path for path, status in zip(self.paths, statuses, strict=False) if status == 0]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.01):
    """Poll ``predicate`` quickly (kill points are short windows) until true or time out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def count_instances(node: NodeProcess) -> int:
    with node.manager._sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def series_jobs(node: NodeProcess, uid: str) -> list[Job]:
    with node.manager._sessions() as session:
        return list(
            session.scalars(select(Job).where(Job.series_instance_uid == uid).order_by(Job.id))
        )


def done_events(node: NodeProcess, job_id: int) -> int:
    """How many times the job's timeline says it became ``done``."""
    with node.manager._sessions() as session:
        query = select(func.count()).where(
            JobEvent.job_id == job_id, JobEvent.to_state == JobState.DONE
        )
        return int(session.scalar(query) or 0)


def wait_series_done(node: NodeProcess, uid: str, instances: int, timeout: float = 240.0) -> Job:
    """Wait until the newest job of series ``uid`` covers ``instances`` and is final."""
    final = {JobState.DONE, JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED}

    def finished() -> bool:
        jobs = series_jobs(node, uid)
        return bool(jobs) and jobs[-1].instance_count >= instances and jobs[-1].state in final

    node.wait_for(finished, timeout, f"a final job for series {uid} with {instances} instances")
    return series_jobs(node, uid)[-1]


def assert_in_spool(node: NodeProcess, paths: list[Path]) -> None:
    """Each file is recorded once, its spool copy exists, is whole and has the sent bytes."""
    spool = node.state_dir / "spool"
    with node.manager._sessions() as session:
        for path in paths:
            uid = sop_uid(path)
            rows = list(session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)))
            assert len(rows) == 1, f"instance {uid} acknowledged but recorded {len(rows)} times"
            stored = spool / rows[0].spool_path
            assert not stored.name.endswith(TMP_SUFFIX), stored
            data = stored.read_bytes()
            assert hashlib.sha256(data).hexdigest() == rows[0].sha256, f"{uid}: sha differs"
            copy = pydicom.dcmread(stored)
            assert copy.SOPInstanceUID == uid
            assert copy.PixelData == pydicom.dcmread(path).PixelData, f"{uid}: pixels differ"


def assert_no_partial_taken(node: NodeProcess) -> None:
    """No recorded spool path (received or derived) is a temporary file, and each exists."""
    spool = node.state_dir / "spool"
    with node.manager._sessions() as session:
        recorded = list(session.scalars(select(Instance.spool_path))) + list(
            session.scalars(select(DerivedInstance.spool_path))
        )
    for relative in recorded:
        assert not relative.endswith(TMP_SUFFIX), relative
        assert (spool / relative).is_file(), f"{relative} is recorded but not in the spool"


def assert_series_delivered_once(
    node: NodeProcess, orthanc: OrthancServer, uid: str, slices: int
) -> Job:
    """The series' last job is done once, and Orthanc holds its derived instances once."""
    jobs = series_jobs(node, uid)
    assert jobs, f"no job for series {uid}"
    for job in jobs:  # one job per settle: earlier ones ended too, none twice
        assert job.state in (JobState.DONE, JobState.SKIPPED), (job.id, job.state, job.last_error)
        assert done_events(node, job.id) == (1 if job.state == JobState.DONE else 0), job.id
    last = jobs[-1]
    assert last.state == JobState.DONE and last.instance_count == slices, last.last_error
    derived = orthanc.series_instances(last.output_series_uid)
    assert len(derived) == slices
    uids = [record["MainDicomTags"]["SOPInstanceUID"] for record in derived]
    assert len(set(uids)) == slices
    return last


#: A value a test puts where a UID belongs: it must never reach the node's log.
INJECTED = "QQPROBE^SECRET"
#: The phantoms' patient name, ID and birth date, and the injected value.
HEADER_VALUES = ["PHANTOM^CT", "PHANTOM-0001", "19700101", INJECTED, "QQPROBE"]


def assert_no_header_values_logged(node: NodeProcess) -> None:
    """No patient name, ID or birth date, and no injected value, in any line of the log."""
    text = node.log_text()
    for value in HEADER_VALUES:
        assert value not in text, f"{value!r} appears in the node's log"
    assert "Traceback" not in text, "a traceback reached the node's log"


def good_series_goes_through(node: NodeProcess, folder: Path, seed: int = 4242) -> Job:
    """The closing check of a bad-input test: a good series is still received and done,
    and nothing the bad input carried reached the log."""
    series = write_phantom_series(
        folder / f"good-{seed}", PhantomSpec(slices=6, size=64, seed=seed, series_description="OK")
    )
    assert storescu(node.port, series) == [0] * len(series)
    job = wait_series_done(node, series_uid(series[0]), len(series))
    assert job.state == JobState.DONE, job.last_error
    assert node.process is not None and node.process.poll() is None
    assert_no_header_values_logged(node)
    return job


def send_raw(
    port: int,
    paths: list[Path],
    calling_ae: str = "FUZZER",
    contexts: list[tuple[str, list[str]]] | None = None,
) -> list[int | None]:
    """Send files byte for byte with pynetdicom over one association; a status per file.

    pynetdicom streams a file's data set as it is on disk (only its file meta is parsed),
    so malformed data reaches the node as written, which DCMTK's storescu would refuse
    to send.  None means no answer (the association was aborted).
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntaxes in contexts or [
        (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ]:
        ae.add_requested_context(sop_class, syntaxes)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DENOISE")
        assert assoc.is_established, "the node refused the association"
        statuses: list[int | None] = []
        try:
            for path in paths:
                status = assoc.send_c_store(path) if assoc.is_established else None
                statuses.append(int(status.Status) if status and "Status" in status else None)
        finally:
            if assoc.is_established:
                assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
