"""kill -9 of the node at several points of each role, then a restart: nothing lost or doubled.

Each role is killed where its work is half done: the receiver during a storescu
association, the worker in the middle of a series, the sender in the middle of a send.
The worker and sender kills run the roles as separate processes (as docker-compose
does), so only the killed role dies.  After the restart the test checks the promises:
every acknowledged instance is in the spool (whole, same bytes) and the job table,
every job ends ``done`` once, Orthanc holds every derived instance once, and no
temporary file is recorded as a whole one.

The full matrix of kill points runs on SQLite; PostgreSQL runs the middle point of
each role (the claims and transactions differ per backend, the kill points do not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from devtools.onnx_models import write_mean_filter_model
from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs import JobState
from node.jobs.tables import Delivery
from tests.fixtures.dicom import storescu
from tests.reliability.checks import (
    StorescuRun,
    assert_in_spool,
    assert_no_partial_taken,
    assert_series_delivered_once,
    count_instances,
    pacs,
    series_jobs,
    series_uid,
    wait_series_done,
    wait_until,
)

SLICES = 40


def matrix(points: list[str]) -> list:
    """Every point on SQLite, the middle one on PostgreSQL."""
    cases = [pytest.param("sqlite", point, id=f"sqlite-{point}") for point in points]
    middle = points[len(points) // 2]
    cases.append(
        pytest.param("postgresql", middle, id=f"postgresql-{middle}", marks=pytest.mark.postgres)
    )
    return cases


def series(tmp_path: Path, slices: int = SLICES, seed: int = 11) -> list[Path]:
    spec = PhantomSpec(slices=slices, size=128, seed=seed, series_description="Crash")
    return write_phantom_series(tmp_path / f"series-{seed}", spec)


#: receiver kill points: instances in the job table when the node dies ("late" leaves a
#: margin of a few instances so the association is surely still running)
RECEIVE_POINTS = {"first": 1, "half": SLICES // 2, "late": SLICES - 4}


@pytest.mark.parametrize(("db_url", "point"), matrix(list(RECEIVE_POINTS)), indirect=["db_url"])
def test_receiver_killed_during_an_association(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str, point: str
) -> None:
    paths = series(tmp_path)
    node = node_factory(destinations=pacs(orthanc)).start()
    sending = StorescuRun(node.port, paths, tmp_path / "scanner")
    wait_until(lambda: count_instances(node) >= RECEIVE_POINTS[point], 120, f"{point} instance")
    node.kill()
    acknowledged = sending.acknowledged()
    assert len(acknowledged) < len(paths), "the kill came after the association ended"

    node.start()  # same config, same port, same spool and job table
    assert_in_spool(node, acknowledged)
    # The scanner saw failures, so it sends the series again, as a real one would.
    assert storescu(node.port, paths) == [0] * len(paths)
    wait_series_done(node, series_uid(paths[0]), len(paths))
    assert_in_spool(node, paths)
    assert_series_delivered_once(node, orthanc, series_uid(paths[0]), len(paths))
    assert orthanc.count_instances() == len(paths)
    node.stop()
    assert_no_partial_taken(node)


#: worker kill points: derived files written for the job when the worker dies.  "late"
#: leaves three slices: the writer thread may write the last two together and the job
#: leave ``running`` a moment later, a window a busy machine's poll missed at SLICES - 1.
WORK_POINTS = {"claimed": 0, "half": SLICES // 2, "late": SLICES - 3}


@pytest.mark.parametrize(("db_url", "point"), matrix(list(WORK_POINTS)), indirect=["db_url"])
def test_worker_killed_in_the_middle_of_a_series(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str, point: str
) -> None:
    # A deep mean filter, one slice per batch: about 0.1 s a slice, a window to kill in.
    slow = write_mean_filter_model(tmp_path / "slow.onnx", kernel=5, layers=200)
    front = node_factory("receive,send", destinations=pacs(orthanc)).start()
    worker = node_factory("work", model_path=str(slow), batch_size=1).start()
    paths = series(tmp_path)
    assert storescu(front.port, paths) == [0] * len(paths)

    def running_with(written: int) -> bool:
        jobs = series_jobs(front, series_uid(paths[0]))
        if not jobs or jobs[0].state != JobState.RUNNING:
            return False
        folder = front.state_dir / "spool" / "derived" / str(jobs[0].id)
        return len(list(folder.glob("*.dcm"))) >= written

    wait_until(lambda: running_with(WORK_POINTS[point]), 180, f"worker at {point}")
    worker.kill()
    (job,) = series_jobs(front, series_uid(paths[0]))
    assert job.state == JobState.RUNNING, "the kill came after the series was denoised"

    # A new worker takes the job once the dead one's heartbeat is stale.
    node_factory("work", model_path=str(slow), batch_size=1).start()
    wait_series_done(front, series_uid(paths[0]), len(paths))
    last = assert_series_delivered_once(front, orthanc, series_uid(paths[0]), len(paths))
    assert last.attempts == 2, "the killed attempt and the one that finished"
    assert orthanc.count_instances() == len(paths)
    assert_in_spool(front, paths)
    assert_no_partial_taken(front)


#: Two associations: the multi-association path, with a kill window four (the default)
#: made too short to hit reliably at 40 slices.
ASSOCIATIONS = 2


def two_associations(orthanc: OrthancServer) -> dict:
    ((name, peer),) = pacs(orthanc).items()
    return {name: {**peer, "associations": ASSOCIATIONS}}


#: sender kill points: deliveries recorded when the sender dies
SEND_POINTS = {"first": 1, "half": SLICES // 2, "late": SLICES - 4}


@pytest.mark.parametrize(("db_url", "point"), matrix(list(SEND_POINTS)), indirect=["db_url"])
def test_sender_killed_in_the_middle_of_a_send(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str, point: str
) -> None:
    front = node_factory("receive,work", destinations=pacs(orthanc)).start()
    paths = series(tmp_path)
    assert storescu(front.port, paths) == [0] * len(paths)
    uid = series_uid(paths[0])
    # Let the worker finish first, so the sender has the whole series to send at once.
    front.wait_for(
        lambda: any(job.state == JobState.SENDING for job in series_jobs(front, uid)),
        180,
        "the series to be denoised",
    )
    sender = node_factory("send", destinations=two_associations(orthanc)).start()

    def delivered() -> int:
        with front.manager._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Delivery)) or 0)

    wait_until(lambda: delivered() >= SEND_POINTS[point], 120, f"sender at {point}")
    sender.kill()
    (job,) = series_jobs(front, uid)
    assert job.state == JobState.SENDING, "the kill came after the series was sent"
    # Orthanc may hold one more per association than was recorded: stored, then killed
    # before the record (each association sends its next instance once its last is recorded).
    assert delivered() <= orthanc.count_instances() <= delivered() + ASSOCIATIONS

    node_factory("send", destinations=two_associations(orthanc)).start()
    wait_series_done(front, uid, len(paths))
    assert_series_delivered_once(front, orthanc, uid, len(paths))
    assert orthanc.count_instances() == len(paths)
    assert_no_partial_taken(front)
