"""The dashboard against guessing and floods, over real HTTP to a running node (both databases).

Figures (lock timing, /healthz latency, memory growth) are printed, not asserted tightly:
the machine is shared.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

from devtools.node_process import NodeProcess
from devtools.tools import free_port
from node import db
from node.web.auth import hash_password
from tests.fixtures.admin import AdminNode

ADMIN, PASSWORD = "alice", "alice-secret"
OTHER_ADDRESS = "127.0.0.2"


def add_user(config: Path, name: str, password: str, role: str = "admin") -> None:
    """Append a ``[[web_users]]`` table (devtools' writer knows flat keys only)."""
    with config.open("a", encoding="utf-8") as file:
        file.write(
            f'\n[[web_users]]\nname = "{name}"\nrole = "{role}"\n'
            f'password_hash = "{hash_password(password)}"\n'
        )


def request(
    port: int,
    path: str,
    *,
    user: tuple[str, str] | None = None,
    source: str = "127.0.0.1",
    method: str = "GET",
    body: str | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    """One request from ``source`` (any 127.0.0.0/8 address is this machine)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=30, source_address=(source, 0)
    )
    sent = dict(headers or {})
    if user is not None:
        sent["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    connection.request(method, path, body=body, headers=sent)
    answer = connection.getresponse()
    answer.read()
    connection.close()
    return answer


def start_web(node_factory: Callable[..., NodeProcess], **settings: object) -> NodeProcess:
    port = free_port()
    node = node_factory(roles="web", web_host="0.0.0.0", web_port=port, **settings)
    add_user(node.config, ADMIN, PASSWORD)
    node.start()
    node.wait_for(lambda: _healthy(port), 30, "the dashboard")
    node.web_port = port  # type: ignore[attr-defined]
    return node


def _healthy(port: int) -> bool:
    try:
        return request(port, "/healthz").status == 200
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_wrong_passwords_lock_the_pair_not_the_account(node_factory) -> None:
    lock_seconds = 2.0
    node = start_web(
        node_factory,
        web_login_delay_seconds=0.001,
        web_login_max_delay_seconds=0.002,
        web_login_lock_after=10,
        web_login_lock_seconds=lock_seconds,
        web_login_address_lock_after=1000,
    )
    port = node.web_port  # type: ignore[attr-defined]
    statuses, sent_at = [], []
    for _ in range(200):
        sent_at.append(time.monotonic())
        statuses.append(request(port, "/api/v1/jobs", user=(ADMIN, "wrong")).status)
    assert set(statuses) <= {401, 429} and statuses.count(429) >= 150, statuses
    tenth_failure = [i for i, status in enumerate(statuses) if status == 401][9]
    locked_at = sent_at[tenth_failure]  # the lock began during this request, not before
    refused = request(port, "/api/v1/jobs", user=(ADMIN, PASSWORD))
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    elsewhere = request(port, "/api/v1/jobs", user=(ADMIN, PASSWORD), source=OTHER_ADDRESS)
    assert elsewhere.status == 200, "a lock must not reach other addresses"
    while request(port, "/api/v1/jobs", user=(ADMIN, PASSWORD)).status == 429:
        assert time.monotonic() - locked_at < lock_seconds + 20, "the lock never ended"
        time.sleep(0.05)
    unlocked_after = time.monotonic() - locked_at
    print(
        f"\nlock: set {lock_seconds} s; the right password from that address "
        f"worked again after {unlocked_after:.2f} s"
    )
    assert unlocked_after >= lock_seconds
    audit = [json.loads(line) for line in node.log_text().splitlines() if '"audit"' in line]
    locks = [r for r in audit if "locked for" in r["message"]]
    assert locks and locks[0]["user"] == ADMIN and locks[0]["address"] == "127.0.0.1"
    failed = [r for r in audit if r["message"].startswith("failed web login")]
    assert len(failed) >= 10 and all(r["address"] == "127.0.0.1" for r in failed)
    assert PASSWORD not in node.log_text() and "wrong" not in {r.get("user") for r in audit}
    assert request(port, "/api/v1/jobs", user=(ADMIN, "x"), source=OTHER_ADDRESS).status == 401
    node.wait_for(lambda: _failed_from(node, OTHER_ADDRESS), 10, "the audit line")


def _failed_from(node: NodeProcess, address: str) -> bool:
    """The node saw the client's own address (127.0.0.2 is not 127.0.0.1)."""
    return any(
        r["message"].startswith("failed web login") and r["address"] == address
        for r in audit_lines(node)
    )


def test_the_login_form_says_how_long_to_wait(node_factory) -> None:
    node = start_web(node_factory, web_login_delay_seconds=30.0)
    browser = Browser(node.web_port)  # type: ignore[attr-defined]
    for password in ("wrong", PASSWORD):
        token = csrf_of(browser.get("/login").text)
        answer = browser.post(
            "/login", data={"username": ADMIN, "password": password, "csrf_token": token}
        )
        assert answer.status_code == 303 and answer.headers["location"].endswith("/login")
    page = browser.get("/login").text
    assert re.search(r"too many failed logins: try again in (29|30) s", page), page
    assert browser.get("/").status_code == 303, "the right password was not even checked"


def test_parallel_wrong_basic_attempts_keep_the_node_responsive(node_factory) -> None:
    node = start_web(node_factory, web_login_address_lock_after=1000)
    port = node.web_port  # type: ignore[attr-defined]
    assert node.process is not None
    for _ in range(3):  # warm up: the first hash and the first requests allocate
        request(port, "/api/v1/jobs", user=("warm", "up"))
    before = rss_bytes(node.process.pid)
    statuses: list[int] = []
    peak = [before]

    def attempt(index: int) -> None:
        statuses.append(request(port, "/api/v1/jobs", user=(f"guess{index}", "wrong")).status)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    latencies = []
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        assert request(port, "/healthz").status == 200
        latencies.append(time.monotonic() - started)
        peak.append(rss_bytes(node.process.pid))
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    growth = max(peak) - before
    print(
        f"\n40 parallel wrong Basic logins: statuses {sorted(set(statuses))}, "
        f"/healthz max {max(latencies) * 1000:.1f} ms median "
        f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} probes, "
        f"RSS growth {growth / 2**20:.1f} MiB"
    )
    assert sorted(set(statuses)) in ([401], [401, 429], [429])
    assert growth < 128 * 2**20, "the throttle bounds the hashes at once and their threads"
    assert max(latencies) < 5.0, "generous cap: /healthz answers past the busy threads"


class Browser(requests.Session):
    """A browser-like client of one node: cookies kept, redirects not followed."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        kwargs["allow_redirects"] = False
        kwargs.setdefault("timeout", 30)
        return super().request(method, self.base + url, *args, **kwargs)


def csrf_of(html: str) -> str:
    token = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert token, html
    return token.group(1)


def login(port: int, name: str, password: str) -> Browser:
    """Log in through the form (cookies, CSRF token), as a browser does."""
    browser = Browser(port)
    form = browser.get("/login")
    entered = browser.post(
        "/login", data={"username": name, "password": password, "csrf_token": csrf_of(form.text)}
    )
    assert entered.status_code == 303 and entered.headers["location"] == "/", entered.headers
    return browser


def audit_lines(node: NodeProcess) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    return [record for record in records if record.get("audit")]


def test_every_preview_view_names_the_user(admin_node: AdminNode, node_factory) -> None:
    node = start_web(node_factory)
    port, job_id = node.web_port, admin_node.jobs["done"]  # type: ignore[attr-defined]
    alice = login(port, ADMIN, PASSWORD)
    for kind in ("soft", "lung", "diff"):
        assert alice.get(f"/jobs/{job_id}/preview/{kind}.png").status_code == 200
        seen = request(port, f"/jobs/{job_id}/preview/{kind}.png", user=(ADMIN, PASSWORD))
        assert seen.status == 200
    assert request(port, f"/api/v1/jobs/{job_id}", user=(ADMIN, PASSWORD)).status == 200
    node.wait_for(lambda: len(_views(node)) >= 7, 10, "the audit lines")
    views = _views(node)
    assert [v["action"] for v in views].count("read") == 1
    assert len([v for v in views if v["action"].startswith("preview")]) == 6
    assert all(v["actor"] == f"web:{ADMIN}" and v["job_ids"] == [job_id] for v in views)
    study = admin_node.ctx.queries.get_job(job_id).study_instance_uid
    assert study not in json.dumps(views), "no patient data in the audit log"


def _views(node: NodeProcess) -> list[dict[str, Any]]:
    return [r for r in audit_lines(node) if r.get("action", "").startswith(("preview", "read"))]


def flood(port: int, count: int, threads: int = 4) -> list[int]:
    """``count`` anonymous requests (login forms, refused API reads) over kept-alive connections."""
    statuses: list[int] = []

    def run(share: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for index in range(share):
            connection.request("GET", "/login" if index % 2 else "/api/v1/jobs")
            answer = connection.getresponse()
            answer.read()
            statuses.append(answer.status)
        connection.close()

    workers = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses


def test_logins_survive_floods_and_restarts_and_end_at_logout(node_factory) -> None:
    node = start_web(node_factory)
    port = node.web_port  # type: ignore[attr-defined]
    alice = login(port, ADMIN, PASSWORD)
    token = alice.cookies["denoise_node_session"]
    statuses = flood(port, 10_000)
    assert len(statuses) == 10_000 and set(statuses) == {200, 401}
    assert alice.get("/").status_code == 200, "anonymous traffic logged alice out"
    with db.make_engine(node.db_url).connect() as connection:
        stored = connection.execute(text("SELECT token_sha256 FROM web_logins")).scalars().all()
    assert stored == [hashlib.sha256(token.encode()).hexdigest()], "one login, its hash only"
    assert node.stop() == 0
    node.start()
    node.wait_for(lambda: _healthy(port), 30, "the dashboard after the restart")
    page = alice.get("/")
    assert page.status_code == 200 and f"{ADMIN} · admin" in page.text, "a restart logged out"
    assert alice.post("/logout", data={"csrf_token": csrf_of(page.text)}).status_code == 303
    assert alice.get("/").status_code == 303
    replayed = Browser(port)
    replayed.cookies.set("denoise_node_session", token)
    assert replayed.get("/").status_code == 303, "a revoked login's cookie opens nothing"


def test_logins_expire(node_factory) -> None:
    node = start_web(node_factory, web_session_seconds=1.0)
    alice = login(node.web_port, ADMIN, PASSWORD)  # type: ignore[attr-defined]
    assert alice.get("/").status_code == 200
    time.sleep(1.5)
    assert alice.get("/").status_code == 303
