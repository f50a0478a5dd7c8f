"""Housekeeping on real spool files: retention, high-water mark, orphans, commitment (both DBs)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import update

from node.cli import main
from node.db import utcnow
from node.housekeeping import Housekeeper
from node.jobs.intake import insert_new_instance
from node.jobs.states import EventKind
from node.jobs.tables import Job
from node.service import _role_loops
from node.web import create_app
from tests.fixtures.admin import AdminNode, denoise
from tests.fixtures.jobs import instance_record, waits_for_a_lock

DAY = 86400.0
POSTGRES = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)


def configure(node: AdminNode, **values: Any) -> None:
    """Change settings of the running context, as a restarted node would read them."""
    node.ctx.settings = node.ctx.settings.model_copy(update=values)


def files_of(node: AdminNode, name: str) -> tuple[list[Path], list[Path]]:
    """(received, derived) files of the named job, as paths."""
    queries, spool = node.ctx.queries, node.ctx.spool
    job = queries.get_job(node.jobs[name])
    received = [spool.path(i.spool_path) for i in queries.series_instances(job.series_instance_uid)]
    derived = [spool.path(d.spool_path) for d in queries.derived_instances(job.id)]
    return received, derived


def purged(node: AdminNode, name: str) -> list[str]:
    events = node.ctx.queries.job_events(node.jobs[name])
    return [e.message for e in events if e.kind is EventKind.PURGED]


def write_file(path: Path, age_seconds: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM" * 64)
    moment = time.time() - age_seconds
    os.utime(path, (moment, moment))
    return path


def test_retention_removes_only_files_of_finished_jobs(admin_node: AdminNode) -> None:
    housekeeper = Housekeeper(admin_node.ctx)
    configure(admin_node, retention_days=1.0, spool_high_water_percent=100.0)
    done_received, done_derived = files_of(admin_node, "done")
    queued_received, _ = files_of(admin_node, "queued")
    assert housekeeper.run_once() is False
    assert all(p.exists() for p in done_received + done_derived) and not purged(admin_node, "done")

    configure(admin_node, retention_days=0.5 / DAY)  # half a second
    time.sleep(0.6)
    housekeeper.run_once()
    assert not any(p.exists() for p in done_received + done_derived)
    assert all(p.exists() for p in queued_received), "an unfinished job keeps its files"
    for name in ("done", "failed", "skipped"):
        (message,) = purged(admin_node, name)
        assert "retention" in message
    assert purged(admin_node, "queued") == []
    last = admin_node.ctx.queries.last_housekeeping()
    assert last is not None and last.actor == "housekeeping" and last.jobs == 3
    assert last.files == 3 * 5 + 5 and last.bytes > 0

    housekeeper.run_once()
    assert len(purged(admin_node, "done")) == 1, "a purged job is purged once"
    admin_node.ctx.manager.record_purge(admin_node.jobs["done"], "second-housekeeper", "0 files")
    assert len(purged(admin_node, "done")) == 1, "two housekeepers write one event"


def test_high_water_mark_purges_recent_jobs_oldest_first(admin_node: AdminNode) -> None:
    configure(admin_node, retention_days=30.0, spool_high_water_percent=100.0)
    Housekeeper(admin_node.ctx).run_once()
    assert purged(admin_node, "done") == []
    configure(admin_node, spool_high_water_percent=0.0)  # any used byte is above the mark
    Housekeeper(admin_node.ctx).run_once()
    order = [
        admin_node.ctx.queries.job_events(admin_node.jobs[name])[-1].id
        for name in ("done", "failed", "skipped")
    ]
    assert order == sorted(order), "the oldest finished job goes first"
    (message,) = purged(admin_node, "done")
    assert "full, above 0%" in message
    assert purged(admin_node, "queued") == []
    assert all(p.exists() for p in files_of(admin_node, "queued")[0])


def test_orphans_go_after_the_grace_period_but_never_of_unfinished_jobs(
    admin_node: AdminNode,
) -> None:
    root = admin_node.ctx.spool.root
    configure(admin_node, retention_days=30.0, spool_high_water_percent=100.0)
    configure(admin_node, orphan_grace_seconds=3600.0)
    old_orphan = write_file(root / "incoming" / "20200101" / "lost.dcm", age_seconds=7200)
    young_orphan = write_file(root / "incoming" / "20200101" / "new.dcm", age_seconds=60)
    failed_leftover = write_file(
        root / "derived" / str(admin_node.jobs["failed"]) / "00003.dcm", age_seconds=7200
    )
    running_file = write_file(
        root / "derived" / str(admin_node.jobs["queued"]) / "00000.dcm", age_seconds=7200
    )
    # a web role running for two hours: its lock file stays, an old part file goes
    web_role_lock = write_file(root / "stow" / "a1b2.lock", age_seconds=7200)
    stale_part = write_file(root / "stow" / "a1b2" / "x.stow-part", age_seconds=7200)
    Housekeeper(admin_node.ctx).run_once()
    assert not old_orphan.exists() and not failed_leftover.exists() and not stale_part.exists()
    assert young_orphan.exists() and running_file.exists() and web_role_lock.exists()
    assert all(p.exists() for p in sum(files_of(admin_node, "done"), []))
    last = admin_node.ctx.queries.last_housekeeping()
    assert last is not None and last.orphan_files == 3 and last.jobs == 0

    configure(admin_node, orphan_grace_seconds=30.0)
    Housekeeper(admin_node.ctx).run_once()
    assert not young_orphan.exists() and running_file.exists()


def test_a_failed_jobs_unrecorded_derived_files_go_with_its_retention(
    admin_node: AdminNode,
) -> None:
    leftover = write_file(
        admin_node.ctx.spool.root / "derived" / str(admin_node.jobs["failed"]) / "x.dcm"
    )
    configure(admin_node, retention_days=0.0, spool_high_water_percent=100.0)
    Housekeeper(admin_node.ctx).run_once()
    assert not leftover.exists() and not leftover.parent.exists()
    assert "1 derived" in purged(admin_node, "failed")[0]


def acknowledged_by_pacs(node: AdminNode, name: str) -> None:
    """Denoise the named queued job and have ``pacs`` acknowledge every instance; the job
    stays in ``sending`` with the sender's claim."""
    ctx, job_id = node.ctx, node.jobs[name]
    denoise(ctx, job_id, files_of(node, name)[0])
    assert ctx.manager.claim_sending_job("sender-1", stale_after=60) is not None
    ctx.manager.open_destinations(job_id, "sender-1", ["pacs"])
    for derived in ctx.queries.derived_instances(job_id):
        ctx.manager.record_deliveries(job_id, "pacs", [(derived.sop_instance_uid, 0)])
    ctx.manager.acknowledge_destination(job_id, "sender-1", "pacs")


def ask_pacs_for_commitment(node: AdminNode, timeout: float) -> None:
    pacs = node.ctx.settings.destinations["pacs"].model_copy(
        update={"storage_commitment": True, "commitment_timeout_seconds": timeout}
    )
    configure(node, destinations={"pacs": pacs}, retention_days=0.0)


def test_deliveries_made_before_commitment_was_turned_on_do_not_hold_the_job(
    admin_node: AdminNode,
) -> None:
    ctx, job_id = admin_node.ctx, admin_node.jobs["queued"]
    acknowledged_by_pacs(admin_node, "queued")
    ctx.manager.finish_sending(job_id, "sender-1", "all destinations acknowledged")
    ask_pacs_for_commitment(admin_node, timeout=3600.0)
    configure(admin_node, spool_high_water_percent=0.0)
    _, derived = files_of(admin_node, "queued")
    Housekeeper(ctx).run_once()
    assert purged(admin_node, "queued"), "no report can come for a request never made"
    assert not any(p.exists() for p in derived)


@pytest.mark.parametrize("wait_ends_by", ["report", "timeout"])
def test_a_commitment_request_still_awaited_keeps_the_files(
    admin_node: AdminNode, wait_ends_by: str
) -> None:
    ctx, job_id = admin_node.ctx, admin_node.jobs["queued"]
    acknowledged_by_pacs(admin_node, "queued")
    ask_pacs_for_commitment(admin_node, timeout=3600.0)
    uids = [d.sop_instance_uid for d in ctx.queries.derived_instances(job_id)]
    request = ctx.manager.request_commitment(job_id, "sender-1", "pacs", generate_uid(), len(uids))
    ctx.manager.cancel_job(job_id, "admin")  # final, while the report is awaited
    configure(admin_node, spool_high_water_percent=0.0)
    _, derived = files_of(admin_node, "queued")
    Housekeeper(ctx).run_once()
    assert purged(admin_node, "done"), "jobs without a destination state are not held"
    assert purged(admin_node, "queued") == [] and all(p.exists() for p in derived)

    if wait_ends_by == "report":
        report = ctx.manager.record_commitment(str(request.commitment_uid), uids, "", "pacs")
        assert report is not None and report.outcome == "committed"
    else:
        ask_pacs_for_commitment(admin_node, timeout=0.5)
        time.sleep(0.6)
    Housekeeper(ctx).run_once()
    assert purged(admin_node, "queued") and not any(p.exists() for p in derived)


def test_status_and_dashboard_show_the_last_run(
    admin_node: AdminNode, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(admin_node.config)]
    main([*argv, "status"])
    assert "Housekeeping  never ran" in capsys.readouterr().out
    assert main([*argv, "purge", "--older-than", "0"]) == 0
    assert "0 orphaned files" in capsys.readouterr().out
    main([*argv, "status"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Housekeeping"))
    assert "by cli:" in line and "3 jobs purged, 20 files (0 orphaned)" in line
    web = TestClient(create_app(admin_node.ctx), base_url="http://127.0.0.1:8080")
    card = web.get("/partials/dashboard").text
    assert 'id="housekeeping"' in card and "20 files (0 orphaned) of 3 jobs" in card
    assert web.get("/api/v1/status").json()["housekeeping"]["files"] == 20


def test_the_send_and_receive_roles_run_housekeeping(admin_node: AdminNode) -> None:
    stop = threading.Event()
    assert "housekeeping" in _role_loops(admin_node.ctx, ["send"], stop)
    assert "housekeeping" in _role_loops(admin_node.ctx, ["receive"], stop)
    assert "housekeeping" not in _role_loops(admin_node.ctx, ["web"], stop)
    configure(admin_node, retention_days=0.0, housekeeping_seconds=0.05)
    loop = _role_loops(admin_node.ctx, ["send"], stop)["housekeeping"]
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not purged(admin_node, "skipped"):
        assert time.monotonic() < deadline, "the housekeeping loop did not run"
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def purge_while_uncommitted(node: AdminNode, write: Any) -> None:
    """Run housekeeping (retention 0) while ``write(connection)`` is in a transaction
    that commits only once housekeeping waits for it (or has finished without waiting)."""
    configure(node, retention_days=0.0, spool_high_water_percent=100.0)
    housekeeping = threading.Thread(target=Housekeeper(node.ctx).run_once)
    with node.ctx.engine.begin() as connection:
        write(connection)
        housekeeping.start()
        waits_for_a_lock(node.ctx.engine, housekeeping)
    housekeeping.join(60)


@POSTGRES
def test_an_instance_received_while_purging_keeps_the_files_its_series_needs(
    admin_node: AdminNode,
) -> None:
    job = admin_node.ctx.queries.get_job(admin_node.jobs["done"])
    received, _ = files_of(admin_node, "done")
    late = instance_record(
        generate_uid(),
        job.series_instance_uid,
        study_instance_uid=job.study_instance_uid,
        spool_path="incoming/late/late.dcm",
    )
    purge_while_uncommitted(
        admin_node, lambda connection: insert_new_instance(connection, late, utcnow())
    )
    assert all(p.exists() for p in received), "the series settles again and needs every file"
    assert not any(p.exists() for p in files_of(admin_node, "failed")[0]), "others were purged"


@POSTGRES
def test_a_job_retried_while_purging_keeps_its_input(admin_node: AdminNode) -> None:
    received, _ = files_of(admin_node, "done")
    retry = update(Job).where(Job.id == admin_node.jobs["done"]).values(state="queued")
    purge_while_uncommitted(admin_node, lambda connection: connection.execute(retry))
    assert all(p.exists() for p in received), "a queued job's input was purged"
