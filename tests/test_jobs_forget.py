"""``jobs forget``: a series that failed on bad input is denoised when the scanner resends it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from devtools.phantom import PhantomSpec, write_phantom_series
from node.db import utcnow
from node.jobs import JobManager, JobQueries, JobState
from node.jobs.forgetting import ForgottenJob
from node.jobs.intake import insert_new_instance
from node.jobs.tables import Series
from node.web import create_app
from tests.fixtures.admin import AdminNode
from tests.fixtures.dicom import storescu
from tests.fixtures.jobs import instance_record, settle_series, waits_for_a_lock
from tests.reliability.checks import series_jobs, series_uid, wait_series_done

POSTGRES = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


def phantom(folder: Path, slices: int, size: int) -> list[Path]:
    spec = PhantomSpec(slices=slices, size=size, seed=5, series_description="Forget me")
    return write_phantom_series(folder / f"input-{size}", spec)


def jobs_forget(config: Path, job_id: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "jobs", "forget", str(job_id)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_forgotten_failed_series_is_denoised_when_resent(node_factory, tmp_path: Path) -> None:
    node = node_factory().start()
    good = phantom(tmp_path, slices=6, size=64)
    bad = good[:3] + phantom(tmp_path, slices=6, size=32)[3:]  # slices 4-6 of another size
    assert storescu(node.port, bad) == [0] * 6
    uid = series_uid(bad[0])
    failed = wait_series_done(node, uid, 6)
    assert failed.state == JobState.FAILED and "must match" in (failed.last_error or "")
    spooled = [node.state_dir / "spool" / i.spool_path for i in node.queries.series_instances(uid)]
    assert len(spooled) == 6 and all(path.is_file() for path in spooled)

    assert storescu(node.port, good) == [0] * 6  # a plain resend keeps the first copies
    assert jobs_forget(node.config, 999999).returncode == 1
    forgotten = jobs_forget(node.config, failed.id)
    assert forgotten.returncode == 0, forgotten.stderr
    assert not any(path.exists() for path in spooled), "the bad copies left the spool"
    assert series_jobs(node, uid) == [] and node.queries.series_instances(uid) == []
    assert f"job {failed.id} forgotten by cli:" in forgotten.stderr, "audited"

    assert storescu(node.port, good) == [0] * 6
    job = wait_series_done(node, uid, 6)
    assert job.state == JobState.DONE, job.last_error
    assert job.denoised_count == 6


def test_the_dashboard_forgets_only_finished_jobs(admin_node: AdminNode) -> None:
    web = TestClient(create_app(admin_node.ctx), base_url="http://127.0.0.1:8080")
    jobs = admin_node.jobs
    page = web.get(f"/jobs/{jobs['queued']}")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    refused = web.post(f"/jobs/{jobs['queued']}/forget", data={"csrf_token": token})
    assert refused.status_code == 200 and "cancel it or let it finish first" in refused.text
    assert (
        web.post(f"/jobs/{jobs['failed']}/forget", data={"csrf_token": "forged"}).status_code == 403
    )
    page = web.get(f"/jobs/{jobs['failed']}")
    assert 'action="/jobs/' in page.text and "/forget" in page.text
    done = web.post(f"/jobs/{jobs['failed']}/forget", data={"csrf_token": token})
    assert done.status_code == 200 and f"job {jobs['failed']} forgotten" in done.text
    assert web.get(f"/api/v1/jobs/{jobs['failed']}").status_code == 404
    assert web.get(f"/api/v1/jobs/{jobs['done']}").status_code == 200


@POSTGRES
def test_an_instance_received_while_forgetting_keeps_its_series_or_goes_with_its_file(
    sessions: sessionmaker[Session], manager: JobManager, queries: JobQueries
) -> None:
    series = "1.2.3.4"
    for index in range(3):
        manager.record_instance(instance_record(f"{series}.{index}", series))
    job_id = settle_series(manager, queries, series, skip="too few slices")
    late = instance_record(f"{series}.9", series, spool_path="incoming/x/late.dcm")
    result: dict[str, Any] = {}
    engine = sessions.kw["bind"]
    forgetting = threading.Thread(target=lambda: result.update(done=manager.forget_job(job_id)))
    with engine.begin() as receiving:  # the receiver's transaction, committed after forget waits
        assert insert_new_instance(receiving, late, utcnow())
        forgetting.start()
        assert waits_for_a_lock(engine, forgetting), "forget did not wait for the receiver"
    forgetting.join(30)
    forgotten: ForgottenJob = result["done"]

    remaining = queries.series_instances(series)
    with sessions() as session:
        row = session.get(Series, series)
    if remaining:  # recorded after the forget: it must settle like any new series
        assert [i.sop_instance_uid for i in remaining] == [late.sop_instance_uid]
        assert row is not None and row.instance_count == 1, "an instance without its series"
    else:  # recorded before the forget: forgotten with the file it names
        assert row is None and late.spool_path in forgotten.spool_paths
