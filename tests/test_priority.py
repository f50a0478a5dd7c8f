"""Job priority: worker and sender claims, rules, the CLI and the dashboard (both databases)."""

from __future__ import annotations

import http.cookiejar
import json
import re
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, Request, build_opener, urlopen

import pytest

from node.cli import main
from node.config import Rule, Settings
from node.jobs import JobManager, JobQueries, JobState
from node.jobs.manager import DerivedFile
from node.jobs.states import EventKind
from node.rules import select_series
from tests.fixtures.admin import AdminNode
from tests.fixtures.jobs import instance_record, settle_series


def queue(manager: JobManager, queries: JobQueries, *priorities: int) -> list[int]:
    """One queued job per priority, oldest first."""
    ids = []
    for index, priority in enumerate(priorities):
        series = f"1.2.3.{index}"
        manager.record_instance(instance_record(f"{series}.1", series))
        job_id = settle_series(manager, queries, series)
        if priority:
            manager.set_priority(job_id, priority, "test")
        ids.append(job_id)
    return ids


def test_workers_take_higher_priority_first_then_oldest(
    manager: JobManager, queries: JobQueries
) -> None:
    routine, urgent, routine_later, urgent_later = queue(manager, queries, 0, 5, 0, 5)
    claimed = [manager.claim_next_job(f"w{i}") for i in range(5)]
    assert [job.id if job else None for job in claimed] == [
        urgent,
        urgent_later,
        routine,
        routine_later,
        None,
    ]
    assert claimed[0] is not None and claimed[0].priority == 5


def test_senders_take_higher_priority_first(manager: JobManager, queries: JobQueries) -> None:
    low, high = queue(manager, queries, -1, 0)
    for worker in ("w1", "w2"):
        job = manager.claim_next_job(worker)
        assert job is not None
        manager.record_derived(job.id, worker, [DerivedFile(f"9.{job.id}", "1", None, "d")])
        manager.finish_denoising(job.id, worker, f"9.9.{job.id}", "m", "1", "done")
    first = manager.claim_sending_job("s1", stale_after=60)
    second = manager.claim_sending_job("s2", stale_after=60)
    assert (first and first.id, second and second.id) == (high, low)


def test_a_priority_change_is_in_the_timeline_and_reorders(
    manager: JobManager, queries: JobQueries
) -> None:
    older, newer = queue(manager, queries, 0, 0)
    assert manager.set_priority(newer, 3, "cli:alice") == 0
    event = queries.job_events(newer)[-1]
    assert event.kind is EventKind.ADMIN_ACTION and event.actor == "cli:alice"
    assert event.message == "priority 0 → 3 set by cli:alice" and event.to_state is None
    assert queries.get_job(newer).state == JobState.QUEUED
    job = manager.claim_next_job("w1")
    assert job is not None and job.id == newer


def test_a_rule_sets_the_priority() -> None:
    header = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    header |= {"SeriesDescription": "STAT head"}
    settings = Settings(
        min_slices=1,
        rules=[
            Rule(name="stat", series_description="^STAT", priority=10),
            Rule(name="routine"),
        ],
    )
    assert select_series(settings, [header], "CT1").priority == 10
    routine = select_series(settings, [header | {"SeriesDescription": "abdomen"}], "CT1")
    assert (routine.rule, routine.priority) == ("routine", 0)


def test_cli_changes_and_shows_the_priority(
    admin_node: AdminNode, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = admin_node.jobs["queued"]
    argv = ["--config", str(admin_node.config), "jobs"]
    assert main([*argv, "priority", str(job_id), "7"]) == 0
    assert capsys.readouterr().out.strip() == f"job {job_id}: priority done, now queued, priority 7"
    assert main([*argv, "show", str(job_id)]) == 0
    out = capsys.readouterr().out
    assert f"Job {job_id}  queued  priority 7" in out and "priority 0 → 7 set by cli:" in out
    assert main([*argv, "list", "--json"]) == 0
    listed = {job["id"]: job["priority"] for job in json.loads(capsys.readouterr().out)}
    assert listed[job_id] == 7 and listed[admin_node.jobs["done"]] == 0
    assert main([*argv, "list"]) == 0
    assert "PRIO" in capsys.readouterr().out
    assert main([*argv, "priority", "999999", "1"]) == 1
    assert "999999" in capsys.readouterr().err


@pytest.fixture
def web_url(admin_web_url: str) -> str:
    """The node's web role on a free port (tests.fixtures.admin)."""
    return admin_web_url


def test_api_and_dashboard_change_the_priority(admin_node: AdminNode, web_url: str) -> None:
    job_id = admin_node.jobs["queued"]
    request = Request(
        f"{web_url}/api/v1/jobs/{job_id}/priority",
        data=json.dumps({"priority": 4}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urlopen(request, timeout=10) as answer:
        assert json.load(answer)["priority"] == 4

    browser = build_opener(HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with browser.open(f"{web_url}/jobs/{job_id}", timeout=10) as answer:
        page = answer.read().decode()
    assert re.search(r'id="job-priority">4<', page)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    form = urlencode({"csrf_token": token.group(1), "priority": "-2"}).encode()
    with browser.open(f"{web_url}/jobs/{job_id}/priority", data=form, timeout=10) as answer:
        shown = answer.read().decode()  # the redirect back to the job page, followed
    assert re.search(r'id="job-priority">-2<', shown) and "priority: job" in shown
    with urlopen(f"{web_url}/partials/dashboard", timeout=10) as answer:
        assert '<td class="priority">-2</td>' in answer.read().decode()
    messages = [e.message for e in admin_node.ctx.queries.job_events(job_id)]
    assert "priority 0 → 4 set by web:local" in messages
    assert "priority 4 → -2 set by web:local" in messages


def test_a_priority_out_of_range_is_refused(
    admin_node: AdminNode, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = admin_node.jobs["queued"]
    assert main(["--config", str(admin_node.config), "jobs", "priority", str(job_id), "5000"]) == 1
    assert "from -1000 to 1000" in capsys.readouterr().err
    assert admin_node.ctx.queries.get_job(job_id).priority == 0
