"""REST API, dashboard pages, metrics, health and login against real jobs (both databases)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import threading
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devtools.tools import free_port
from node.config import WebUser
from node.web import create_app, serve_web
from node.web.auth import hash_password, verify_password
from tests.fixtures.admin import SLICES, AdminNode, deliver

LOCAL = "http://127.0.0.1:8080"


def client(node: AdminNode, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(node.ctx), base_url=base_url, follow_redirects=False)


def basic(name: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def test_jobs_are_listed_newest_first_and_filtered(admin_node: AdminNode) -> None:
    api, jobs = client(admin_node), admin_node.jobs
    listed = api.get("/api/v1/jobs").json()
    assert [job["id"] for job in listed] == sorted(jobs.values(), reverse=True)
    assert [j["id"] for j in api.get("/api/v1/jobs?state=failed").json()] == [jobs["failed"]]
    both = api.get("/api/v1/jobs", params=[("state", "done"), ("state", "skipped")]).json()
    assert {job["state"] for job in both} == {"done", "skipped"}
    assert [j["id"] for j in api.get("/api/v1/jobs?ae=CT2").json()] == [jobs["failed"]]
    done = api.get(f"/api/v1/jobs/{jobs['done']}").json()
    study = api.get("/api/v1/jobs", params={"study": done["study_instance_uid"]}).json()
    assert [job["id"] for job in study] == [jobs["done"]]
    assert api.get("/api/v1/jobs?since=2999-01-01T00:00:00%2B02:00").json() == []
    assert len(api.get("/api/v1/jobs?limit=2").json()) == 2
    assert api.get("/api/v1/jobs?state=bogus").status_code == 422


def test_job_detail_has_timeline_counts_and_error(admin_node: AdminNode) -> None:
    api, jobs = client(admin_node), admin_node.jobs
    done = api.get(f"/api/v1/jobs/{jobs['done']}").json()
    assert [e["to_state"] for e in done["events"]] == [
        "queued",
        "running",
        "sending",
        "sending",
        "done",
    ]
    assert done["received_count"] == done["denoised_count"] == SLICES
    assert done["sent"] == {"pacs": SLICES}
    assert done["noise_slices"] == SLICES and done["noise_after_hu"] < done["noise_before_hu"]
    assert done["noise_drop"] == pytest.approx(1 - done["noise_after_hu"] / done["noise_before_hu"])
    assert f"{SLICES} of {SLICES} slices measurable" in done["noise_report"]
    listed = {job["id"]: job for job in api.get("/api/v1/jobs").json()}
    assert listed[jobs["done"]]["noise_drop"] == done["noise_drop"]
    failed = api.get(f"/api/v1/jobs/{jobs['failed']}").json()
    assert failed["last_error"] == "model output has NaN values"
    assert failed["sent"] == {"pacs": 0}
    assert (failed["noise_slices"], failed["noise_report"]) == (None, "not measured")
    missing = api.get("/api/v1/jobs/999999")
    assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]


def test_actions_change_state_and_are_audited(
    admin_node: AdminNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.overview")
    api, jobs = client(admin_node), admin_node.jobs
    retried = api.post(f"/api/v1/jobs/{jobs['failed']}/retry")
    assert retried.status_code == 200 and retried.json()["state"] == "queued"
    events = api.get(f"/api/v1/jobs/{jobs['failed']}").json()["events"]
    assert events[-1]["actor"] == "web:local" and "retry" in events[-1]["message"]
    assert any(getattr(r, "audit", False) and r.action == "retry" for r in caplog.records)

    assert api.post(f"/api/v1/jobs/{jobs['queued']}/cancel").json()["state"] == "cancelled"
    again = api.post(f"/api/v1/jobs/{jobs['queued']}/cancel")
    assert again.status_code == 409 and "cancelled" in again.json()["detail"]

    resent = api.post(f"/api/v1/jobs/{jobs['done']}/resend", json={"destination": "pacs"})
    assert resent.status_code == 200 and resent.json()["state"] == "sending"
    unknown = api.post(f"/api/v1/jobs/{jobs['done']}/resend", json={"destination": "nowhere"})
    assert unknown.status_code == 422 and "'pacs'" in unknown.json()["detail"][0]["msg"]
    schemas = api.get("/api/v1/openapi.json").json()["components"]["schemas"]
    named = schemas["ResendRequest"]["properties"]["destination"]
    assert named.get("enum", [named.get("const")]) == ["pacs"], "the schema names destinations"
    nothing = api.post(f"/api/v1/jobs/{jobs['skipped']}/resend", json={"destination": "pacs"})
    assert nothing.status_code == 409 and "no derived series" in nothing.json()["detail"]
    assert api.post("/api/v1/jobs/999999/retry").status_code == 404


def test_cross_origin_posts_are_refused(admin_node: AdminNode) -> None:
    api, job_id = client(admin_node), admin_node.jobs["failed"]
    refused = api.post(f"/api/v1/jobs/{job_id}/retry", headers={"Origin": "http://evil.test"})
    assert refused.status_code == 403
    page = api.get(f"/jobs/{job_id}")
    form = api.post(
        f"/jobs/{job_id}/retry",
        data={"csrf_token": csrf_of(page.text)},
        headers={"Origin": "http://127.0.0.1:9999"},
    )
    assert form.status_code == 403
    assert api.post(f"/jobs/{job_id}/retry", data={"csrf_token": "forged"}).status_code == 403
    assert api.get(f"/api/v1/jobs/{job_id}").json()["state"] == "failed"
    # A page fetched through a rebound DNS name cannot use the local admin.
    assert client(admin_node, "http://attacker.test").get("/").status_code == 400


def test_dashboard_pages_filter_and_act(admin_node: AdminNode) -> None:
    web, jobs = client(admin_node), admin_node.jobs
    home = web.get("/")
    assert home.status_code == 200
    assert all(f'href="/jobs/{job_id}"' in home.text for job_id in jobs.values())
    assert "C-ECHO ok" in home.text and "CPU" in home.text
    assert home.headers["x-frame-options"] == "DENY"
    failed_only = web.get("/partials/dashboard?state=failed").text
    assert f'href="/jobs/{jobs["failed"]}"' in failed_only
    assert f'href="/jobs/{jobs["done"]}"' not in failed_only
    done = web.get(f"/api/v1/jobs/{jobs['done']}").json()
    drop = f"({100 * done['noise_drop']:.0f}% less)"
    assert f"{done['noise_before_hu']:.0f} → {done['noise_after_hu']:.0f} {drop}" in home.text
    done_page = web.get(f"/jobs/{jobs['done']}").text
    assert re.search(r'id="job-noise">[\d.]+ -&gt; [\d.]+ HU in flat soft tissue', done_page)
    page = web.get(f"/jobs/{jobs['failed']}")
    assert "model output has NaN values" in page.text and "No preview" in page.text
    acted = web.post(f"/jobs/{jobs['failed']}/retry", data={"csrf_token": csrf_of(page.text)})
    assert acted.status_code == 303
    assert "is now queued" in web.get(acted.headers["location"]).text
    assert web.get("/jobs/999999").status_code == 404


def test_job_page_links_the_derived_series_to_a_configured_viewer(admin_node: AdminNode) -> None:
    jobs, settings = admin_node.jobs, admin_node.ctx.settings
    template = "https://pacs.test/view?study={study_uid}&series={series_uid}"
    pacs = settings.destinations["pacs"].model_copy(update={"viewer_url": template})
    admin_node.ctx.settings = settings.model_copy(update={"destinations": {"pacs": pacs}})
    web, manager = client(admin_node), admin_node.ctx.manager
    assert 'id="viewer-' not in web.get(f"/jobs/{jobs['failed']}").text  # nothing derived
    manager.resend_job(jobs["done"], "pacs", "test")
    deliver(admin_node.ctx, jobs["done"], acknowledge=True)
    done = web.get(f"/api/v1/jobs/{jobs['done']}").json()
    link = template.format(
        study_uid=done["study_instance_uid"], series_uid=done["output_series_uid"]
    )
    page = web.get(f"/jobs/{jobs['done']}").text
    assert f'id="viewer-pacs" href="{link.replace("&", "&amp;")}"' in page
    manager.resend_job(jobs["done"], "pacs", "test")  # pacs is pending again: no link
    assert 'id="viewer-' not in web.get(f"/jobs/{jobs['done']}").text


def test_preview_pngs_are_rendered_and_cached(admin_node: AdminNode) -> None:
    web, job_id = client(admin_node), admin_node.jobs["done"]
    assert f"/jobs/{job_id}/preview/soft.png" in web.get(f"/jobs/{job_id}").text
    sizes = {}
    for kind in ("soft", "lung", "diff"):
        response = web.get(f"/jobs/{job_id}/preview/{kind}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        sizes[kind] = image.size
        assert image.getextrema()[0] < image.getextrema()[1], f"{kind} preview is blank"
    assert sizes == {"soft": (260, 128), "lung": (260, 128), "diff": (128, 128)}
    cache = admin_node.settings.state_dir / "previews" / str(job_id)
    before = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    web.get(f"/jobs/{job_id}/preview/soft.png")
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert web.get(f"/jobs/{admin_node.jobs['queued']}/preview/soft.png").status_code == 404


def test_status_and_metrics(admin_node: AdminNode) -> None:
    api = client(admin_node)
    status = api.get("/api/v1/status").json()
    assert status["states"]["done"] == 1 and status["states"]["queued"] == 1
    assert status["oldest_queued_seconds"] >= 0
    (pacs,) = status["destinations"]
    assert pacs["name"] == "pacs" and pacs["reachable"], pacs
    (worker,) = status["workers"]
    assert worker["alive"] and worker["provider"] == "CPUExecutionProvider"
    metrics = api.get("/metrics").text
    for line in (
        'denoise_node_jobs{state="failed"} 1.0',
        "denoise_node_instances_received 20.0",
        'denoise_node_instances_sent{destination="pacs"} 5.0',
        "denoise_node_denoise_seconds_per_slice_count 5.0",
        'denoise_node_worker_provider_info{provider="CPUExecutionProvider",worker="gpu-host:4242"}',
        'denoise_node_destination_up{destination="pacs"} 1.0',
    ):
        assert line in metrics, line
    assert re.search(r"^denoise_node_oldest_queued_job_age_seconds \d", metrics, re.M)
    assert "denoise_node_noise_drop_ratio_count 1.0" in metrics, "the one measured job"
    assert 'denoise_node_noise_drop_ratio_bucket{le="0.0"} 0.0' in metrics
    assert 'denoise_node_noise_drop_ratio_bucket{le="1.0"} 1.0' in metrics


def test_health_and_readiness(admin_node: AdminNode, broken_model: Path) -> None:
    api = client(admin_node)
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {
        "ready": True,
        "checks": {"database": "ok", "spool": "ok", "model": "ok"},
    }
    admin_node.ctx.settings = admin_node.settings.model_copy(update={"model_path": broken_model})
    broken = client(admin_node).get("/readyz")
    assert broken.status_code == 503 and "not loadable" in broken.json()["checks"]["model"]


def test_login_is_required_off_loopback_and_viewers_cannot_act(admin_node: AdminNode) -> None:
    users = [
        WebUser(name="alice", password_hash=hash_password("alice-secret"), role="admin"),
        WebUser(name="victor", password_hash=hash_password("victor-secret"), role="viewer"),
    ]
    admin_node.ctx.settings = admin_node.settings.model_copy(
        update={"web_host": "0.0.0.0", "web_users": users, "web_login_delay_seconds": 0.0}
    )  # no wait after the wrong password below: test_web_guard covers the throttle
    web, job_id = client(admin_node, "http://node.hospital.example"), admin_node.jobs["failed"]
    assert web.get("/").headers["location"].endswith("/login?next=%2F")
    assert web.get("/api/v1/jobs").status_code == 401
    assert web.get("/partials/dashboard").status_code == 401
    viewer = basic("victor", "victor-secret")
    assert web.get("/api/v1/jobs", headers=viewer).status_code == 200
    assert web.post(f"/api/v1/jobs/{job_id}/retry", headers=viewer).status_code == 403
    assert web.get("/api/v1/jobs", headers=basic("victor", "wrong")).status_code == 401

    login = web.get("/login?next=/jobs/1")
    wrong = web.post(
        "/login",
        data={"username": "alice", "password": "nope", "csrf_token": csrf_of(login.text)},
    )
    assert wrong.headers["location"].endswith("/login")
    entered = web.post(
        "/login",
        data={
            "username": "alice",
            "password": "alice-secret",
            "csrf_token": csrf_of(login.text),
            "next": "//evil.test/",
        },
    )
    assert entered.status_code == 303 and entered.headers["location"] == "/"
    page = web.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "alice · admin" in page.text
    acted = web.post(f"/jobs/{job_id}/retry", data={"csrf_token": csrf_of(page.text)})
    assert acted.status_code == 303
    assert web.get(f"/api/v1/jobs/{job_id}").json()["events"][-1]["actor"] == "web:alice"
    assert web.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 403  # session, no token
    web.post("/logout", data={"csrf_token": csrf_of(web.get("/").text)})
    assert web.get("/").status_code == 303


def test_password_hashes() -> None:
    encoded = hash_password("correct horse")
    assert encoded.startswith("scrypt$") and verify_password("correct horse", encoded)
    assert not verify_password("wrong horse", encoded)
    salt = base64.b64encode(b"salt").decode()
    digest = base64.b64encode(hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 1000)).decode()
    assert verify_password("pw", f"pbkdf2_sha256$1000${salt}${digest}")
    assert not verify_password("pw", "scrypt$garbage")


def test_serve_web_runs_uvicorn_until_stop(admin_node: AdminNode) -> None:
    port = free_port()
    admin_node.ctx.settings = admin_node.settings.model_copy(update={"web_port": port})
    stop = threading.Event()
    thread = threading.Thread(target=serve_web, args=(admin_node.ctx, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            with urlopen(f"http://127.0.0.1:{port}/api/v1/jobs?state=done", timeout=2) as answer:
                listed = json.load(answer)
            break
        except URLError:
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.1)
    assert [job["id"] for job in listed] == [admin_node.jobs["done"]]
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_web_role_runs_in_the_node_process(node_factory) -> None:
    """``serve --roles web`` serves until SIGTERM, then exits cleanly."""
    port = free_port()
    node = node_factory(roles="web", web_port=port).start()
    node.wait_for(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), 30, "the dashboard")
    assert node.stop() == 0


def _answers(url: str) -> bool:
    try:
        with urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except URLError:
        return False
