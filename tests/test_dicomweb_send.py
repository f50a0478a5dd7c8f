"""DICOMweb destinations: the sender posts the derived series by STOW-RS over real HTTP.

A real Orthanc with its DICOMweb plugin and HTTP Basic logins is the archive; a small
HTTP server on 127.0.0.1 answers what Orthanc cannot be made to (202, 409, 429, 503,
500, a hang, TLS).  Every test with a job table runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import email.utils
import io
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from devtools.node_process import NodeProcess
from devtools.orthanc import DICOMWEB_PLUGIN, OrthancServer
from devtools.tools import free_port
from node.cli import main
from node.context import NodeContext
from node.destination_checks import check_destinations
from node.dicomweb_client import Part, batches, parse_answer, retry_after_seconds
from node.jobs import JobState
from node.jobs.states import DeliveryState, EventKind
from node.jobs.tables import Delivery
from node.sender import Sender
from tests import test_sender
from tests.fixtures.dicom import storescu
from tests.fixtures.orthanc import DICOMWEB_USERS

# The sender tests' job-table context and TLS certificate, shared rather than copied.
make_context = test_sender.make_context
server_certificate = test_sender.server_certificate
make_sending_job = test_sender.make_sending_job
orthanc_uids = test_sender.orthanc_uids
SLICES = test_sender.SLICES

TOKEN = "tok-3f9a"  # what the fake server expects; must never appear in an error or a log
(USER, PASSWORD) = next(iter(DICOMWEB_USERS.items()))

Answer = tuple[int, dict[str, str], dict[str, Any] | None]


def stow_answer(
    stored: list[str], failed: dict[str, int] | None = None, warning: int | None = None
) -> dict[str, Any]:
    """A STOW-RS answer in DICOM JSON: ReferencedSOPSequence and FailedSOPSequence."""

    def item(uid: str, tag: str | None = None, code: int | None = None) -> dict[str, Any]:
        value = {"00081155": {"vr": "UI", "Value": [uid]}}
        return value | ({tag: {"vr": "US", "Value": [code]}} if tag else {})

    return {
        "00081199": {
            "vr": "SQ",
            "Value": [item(uid, "00081196" if warning else None, warning) for uid in stored],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [item(uid, "00081197", code) for uid, code in (failed or {}).items()],
        },
    }


@dataclass
class Received:
    """One STOW-RS request as the fake server saw it."""

    headers: dict[str, str]
    parts: list[bytes]

    @property
    def uids(self) -> list[str]:
        return [str(dcmread(io.BytesIO(part)).SOPInstanceUID) for part in self.parts]


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a multipart/related request's parts, checked to be application/dicom."""
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    pieces = body.split(b"--" + boundary)
    assert pieces[0] == b"" and pieces[-1] == b"--\r\n"
    parts = []
    for piece in pieces[1:-1]:
        head, _, content = piece.partition(b"\r\n\r\n")
        assert head.strip() == b"Content-Type: application/dicom"
        assert content.endswith(b"\r\n")
        parts.append(content[:-2])
    return parts


class FakeDicomWeb:
    """A DICOMweb server that answers each STOW-RS with the next of ``answers`` (the last
    repeats) and every QIDO-RS with an empty list; it keeps what it received."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.answers: list[Callable[[list[str]], Answer]] = [lambda uids: (200, {}, None)]
        self.received: list[Received] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = Received(
                    dict(self.headers), split_multipart(self.headers["Content-Type"], body)
                )
                fake.received.append(request)
                answer = fake.answers.pop(0) if len(fake.answers) > 1 else fake.answers[0]
                self._reply(*answer(request.uids))

            def do_GET(self) -> None:
                self._reply(200, {}, [])  # type: ignore[arg-type]

            def _reply(self, status: int, headers: dict[str, str], data: Any) -> None:
                payload = b"" if data is None else json.dumps(data).encode()
                try:
                    self.send_response(status)
                    for name, value in {
                        "Content-Type": "application/dicom+json",
                        **headers,
                    }.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if ssl_context else "http"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def destination(self, **values: Any) -> dict[str, dict[str, Any]]:
        return {
            "cloud": {"kind": "dicomweb", "url": self.url, "token_env": "STOW_TEST_TOKEN"} | values
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_dicomweb(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDicomWeb]:
    monkeypatch.setenv("STOW_TEST_TOKEN", TOKEN)
    fake = FakeDicomWeb()
    yield fake
    fake.close()


@pytest.fixture
def orthanc_login(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """Factory: a dicomweb destination for an Orthanc, logging in with ``password``."""

    def make(server: OrthancServer, password: str = PASSWORD, **values: Any) -> dict[str, Any]:
        monkeypatch.setenv("STOW_TEST_USER", USER)
        monkeypatch.setenv("STOW_TEST_PASSWORD", password)
        return {
            "cloud": {
                "kind": "dicomweb",
                "url": server.dicomweb_url,
                "username_env": "STOW_TEST_USER",
                "password_env": "STOW_TEST_PASSWORD",
            }
            | values
        }

    return make


def delivery_statuses(ctx: NodeContext, job_id: int) -> dict[str, int]:
    with Session(ctx.engine) as session:
        rows = session.execute(
            select(Delivery.sop_instance_uid, Delivery.status).where(Delivery.job_id == job_id)
        )
        return {uid: status for uid, status in rows}


def status_command(
    ctx: NodeContext, destinations: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """``denoise-node status`` on this job table with ``destinations``: exit code, output."""
    config = ctx.settings.state_dir / "status.toml"
    lines = [f"state_dir = {json.dumps(str(ctx.settings.state_dir))}"]
    lines.append(f"database_url = {json.dumps(ctx.settings.db_url)}")
    for name, values in destinations.items():
        lines.append(f"[destinations.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    config.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = main(["--config", str(config), "status"])
    return code, capsys.readouterr().out


def postponed_for(ctx: NodeContext, job_id: int) -> float:
    """Seconds the job was postponed by, from its last event (which must be postponed)."""
    event = ctx.queries.job_events(job_id)[-1]
    assert event.kind == EventKind.POSTPONED
    return (ctx.queries.get_job(job_id).run_after - event.at).total_seconds()


# -- a real Orthanc --------------------------------------------------------------------


def test_a_derived_series_arrives_in_a_dicomweb_orthanc(
    dicomweb_orthanc: OrthancServer,
    orthanc_login: Callable[..., dict[str, Any]],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    orthanc = dicomweb_orthanc
    before = orthanc.count_instances()
    destinations = orthanc_login(orthanc, batch_instances=2)
    ctx = make_context(destinations)
    job_id, uids, output_uid = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.DONE, job.last_error
    assert orthanc_uids(orthanc, output_uid) == set(uids)
    assert orthanc.count_instances() - before == SLICES
    assert delivery_statuses(ctx, job_id) == dict.fromkeys(uids, 0)
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.ACKNOWLEDGED
    assert f"{SLICES} instances acknowledged by cloud" in ctx.queries.job_events(job_id)[-1].message
    (check,) = check_destinations(ctx)
    assert (check.kind, check.url, check.reachable) == ("dicomweb", orthanc.dicomweb_url, True)
    assert "QIDO-RS ok" in check.detail
    code, out = status_command(ctx, destinations, capsys)
    assert code == 0 and f"ok   cloud: {orthanc.dicomweb_url}  QIDO-RS ok" in out


def test_a_wrong_password_fails_the_destination_at_once_with_a_configuration_message(
    dicomweb_orthanc: OrthancServer,
    orthanc_login: Callable[..., dict[str, Any]],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    wrong = "not-the-password-8c1"
    destinations = orthanc_login(dicomweb_orthanc, wrong)
    ctx = make_context(destinations)
    job_id, _, output_uid = make_sending_job(ctx, tmp_path, ["cloud"])

    with caplog.at_level(logging.DEBUG):
        assert Sender(ctx).run_once()
        (check,) = check_destinations(ctx)
        code, out = status_command(ctx, destinations, capsys)

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED  # no retries: only a fixed configuration helps
    assert "HTTP 401" in job.last_error and "configuration" in job.last_error
    assert "STOW_TEST_PASSWORD" in job.last_error  # the variable is named, not its value
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.FAILED
    assert orthanc_uids(dicomweb_orthanc, output_uid) == set()
    assert not check.reachable and "HTTP 401" in check.detail
    assert code == 1 and f"FAIL cloud: {dicomweb_orthanc.dicomweb_url}" in out
    events = " ".join(event.message for event in ctx.queries.job_events(job_id))
    for text in (caplog.text, job.last_error, events, check.detail, out):
        assert wrong not in text and PASSWORD not in text


@pytest.mark.orthanc
def test_orthanc_restarted_mid_series_gets_the_rest_once(
    orthanc_login: Callable[..., dict[str, Any]],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", plugins=[DICOMWEB_PLUGIN], users=DICOMWEB_USERS)
    with orthanc:
        ctx = make_context(
            orthanc_login(orthanc, batch_instances=2),
            send_retry_seconds=0.1,
            send_retry_max_seconds=0.1,
        )
        job_id, uids, output_uid = make_sending_job(ctx, tmp_path, ["cloud"])
        record = ctx.manager.record_deliveries

        def record_then_stop_orthanc_after_the_first_batch(*args: Any) -> None:
            record(*args)
            if len(delivery_statuses(ctx, job_id)) == 2:
                orthanc.stop()

        monkeypatch.setattr(
            ctx.manager, "record_deliveries", record_then_stop_orthanc_after_the_first_batch
        )
        sender = Sender(ctx)
        assert sender.run_once()
        job = ctx.queries.get_job(job_id)
        assert job.state == JobState.SENDING and "could not be reached" in job.last_error
        assert ctx.queries.delivery_counts(job_id) == {"cloud": 2}

        orthanc.start()
        time.sleep(postponed_for(ctx, job_id))
        assert sender.run_once()

        job = ctx.queries.get_job(job_id)
        assert job.state == JobState.DONE, job.last_error
        assert "(3 sent now)" in ctx.queries.job_events(job_id)[-1].message
        assert orthanc_uids(orthanc, output_uid) == set(uids)
        assert orthanc.count_instances() == SLICES  # each instance stored once


def test_a_series_stored_by_c_store_comes_back_to_a_dicomweb_only_orthanc(
    node_factory: Callable[..., NodeProcess],
    dicomweb_orthanc: OrthancServer,
    orthanc_login: Callable[..., dict[str, Any]],
    phantom_series: list[Path],
) -> None:
    """The whole node: storescu in, the derived series out by STOW-RS only (the node does
    not know Orthanc's DICOM port); status, dashboard and /metrics show the destination."""
    orthanc = dicomweb_orthanc
    before = orthanc.count_instances()
    web_port = free_port()
    node = node_factory(
        roles="receive,work,send,web",
        web_port=web_port,
        destinations=orthanc_login(orthanc, batch_instances=5),
    ).start()
    assert storescu(node.port, phantom_series) == [0] * len(phantom_series)

    (job,) = node.wait_jobs_final(1)
    assert job.state == JobState.DONE, job.last_error
    derived = {item.sop_instance_uid for item in node.queries.derived_instances(job.id)}
    assert len(derived) == len(phantom_series)
    assert orthanc_uids(orthanc, job.output_series_uid) == derived
    assert orthanc.count_instances() - before == len(phantom_series)  # each once
    assert node.queries.delivery_counts(job.id) == {"cloud": len(phantom_series)}

    web = f"http://127.0.0.1:{web_port}"
    node.wait_for(lambda: _answers(f"{web}/healthz"), 30, "the web role")
    dashboard = requests.get(f"{web}/", timeout=30).text
    assert '<span class="dot ok"></span>cloud (DICOMweb)' in dashboard
    metrics = requests.get(f"{web}/metrics", timeout=30).text
    assert 'denoise_node_destination_up{destination="cloud"} 1.0' in metrics


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


# -- a small server for what Orthanc does not answer -------------------------------------


@pytest.mark.parametrize(("batch", "sizes"), [({}, [2, 2, 1]), ({"batch_bytes": 1024}, [1] * 5)])
def test_stow_posts_the_spool_files_in_batches_with_the_token(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    batch: dict[str, int],
    sizes: list[int],
) -> None:
    ctx = make_context(fake_dicomweb.destination(batch_instances=2, **batch))
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert [len(request.parts) for request in fake_dicomweb.received] == sizes
    assert [uid for request in fake_dicomweb.received for uid in request.uids] == uids
    files = [
        ctx.spool.path(item.spool_path).read_bytes()
        for item in ctx.queries.derived_instances(job_id)
    ]
    assert [part for request in fake_dicomweb.received for part in request.parts] == files
    for request in fake_dicomweb.received:
        assert request.headers["Content-Type"].startswith(
            'multipart/related; type="application/dicom"; boundary='
        )
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["Accept"] == "application/dicom+json"


def test_partial_answers_are_recorded_per_instance(
    fake_dicomweb: FakeDicomWeb, make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    """202: the stored instances are acknowledged, the refused one fails the destination."""
    fake_dicomweb.answers = [lambda uids: (202, {}, stow_answer(uids[1:], {uids[0]: 0xC000}))]
    ctx = make_context(fake_dicomweb.destination(), send_max_attempts=1)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED
    assert f"did not store 1 instance(s): {uids[0]} (FailureReason 0xC000)" in job.last_error
    assert delivery_statuses(ctx, job_id) == dict.fromkeys(uids[1:], 0)


@pytest.mark.parametrize(
    ("answer", "state", "acknowledged", "status", "in_error"),
    [
        # 409: every instance failed for a reason that will not pass
        (
            lambda uids: (409, {}, stow_answer([], dict.fromkeys(uids, 0xA900))),
            "failed",
            0,
            0,
            "FailureReason 0xA900",
        ),
        # out of resources (0xA7xx) passes, as for C-STORE: try later
        (
            lambda uids: (202, {}, stow_answer(uids[:2], dict.fromkeys(uids[2:], 0xA700))),
            "sending",
            2,
            0,
            "FailureReason 0xA700",
        ),
        # stored with a warning: acknowledged with the warning's code, as for C-STORE
        (lambda uids: (200, {}, stow_answer(uids, warning=0xB000)), "done", SLICES, 0xB000, None),
        # 200 with no listing: the status itself says every instance is stored
        (lambda uids: (200, {}, None), "done", SLICES, 0, None),
        # other 4xx: the request is refused
        (
            lambda uids: (413, {}, None),
            "failed",
            0,
            0,
            "HTTP 413 Request Entity Too Large to the STOW-RS of 5 instance(s): lower batch",
        ),
    ],
)
def test_the_answer_decides_per_instance_retry_or_failure(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    answer: Callable[[list[str]], Answer],
    state: str,
    acknowledged: int,
    status: int,
    in_error: str | None,
) -> None:
    fake_dicomweb.answers = [answer]
    ctx = make_context(fake_dicomweb.destination(), send_max_attempts=1)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == state, job.last_error
    assert delivery_statuses(ctx, job_id) == dict.fromkeys(uids[:acknowledged], status)
    assert in_error is None or in_error in job.last_error
    (delivery,) = ctx.queries.destinations(job_id)
    if state == "sending":  # transient: counted by time, not as a refusal
        assert delivery.attempts == 0 and delivery.failing_since is not None


def malformed_answer(uids: list[str]) -> Answer:
    """202 whose DICOM JSON is wrong in every way a careless server may get it wrong."""

    def item(uid: Any, **codes: Any) -> dict[str, Any]:
        return {"00081155": {"vr": "UI", "Value": [uid]}} | {
            tag: {"vr": "US", "Value": [code]} for tag, code in codes.items()
        }

    stored = [
        item([uids[0]]),  # the UID in a list
        item(uids[1], **{"00081196": "B000"}),  # a warning as a string
        item(uids[2], **{"00081196": {"a": 1}}),  # a warning as an object
        item(uids[3], **{"00081196": 0x1_0000}),  # a warning beyond 16 bits
        item(uids[4]),  # this one is fine
    ]
    failed = [item(uids[0], **{"00081197": 10**400})]  # a failure reason of 401 digits
    return 202, {}, {"00081199": {"vr": "SQ", "Value": stored}, "00081198": {"Value": failed}}


def test_a_malformed_answer_leaves_its_instances_not_acknowledged(
    fake_dicomweb: FakeDicomWeb, make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    fake_dicomweb.answers = [malformed_answer, lambda uids: (200, {}, stow_answer(uids))]
    ctx = make_context(
        fake_dicomweb.destination(), send_retry_seconds=0.01, send_retry_max_seconds=0.01
    )
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])
    sender = Sender(ctx)

    assert sender.run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING  # a refusal, counted: send_max_attempts is 3
    assert "did not store 4 instance(s)" in job.last_error
    assert f"{uids[1]} (not acknowledged)" in job.last_error
    assert delivery_statuses(ctx, job_id) == {uids[4]: 0}

    time.sleep(0.05)  # past the backoff
    assert sender.run_once()
    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert fake_dicomweb.received[1].uids == uids[:4]  # only what was not acknowledged


def http_date_in(seconds: float) -> str:
    return email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("status", "retry_after", "low", "high"),
    [(429, lambda: "2", 2.0, 2.0), (503, lambda: http_date_in(3), 1.0, 3.1)],
)
def test_busy_answers_honour_retry_after(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    status: int,
    retry_after: Callable[[], str],
    low: float,
    high: float,
) -> None:
    fake_dicomweb.answers = [
        lambda uids: (status, {"Retry-After": retry_after()}, None),
        lambda uids: (200, {}, stow_answer(uids)),
    ]
    ctx = make_context(
        fake_dicomweb.destination(), send_retry_seconds=0.05, send_retry_max_seconds=0.05
    )
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])
    sender = Sender(ctx)

    assert sender.run_once()
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING and f"HTTP {status}" in job.last_error
    assert low - 0.05 <= postponed_for(ctx, job_id) <= high + 0.05  # not the 0.05 s backoff
    assert not sender.run_once()  # not before the server's time

    time.sleep(postponed_for(ctx, job_id))
    assert sender.run_once()
    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert len(fake_dicomweb.received) == 2


@pytest.mark.parametrize(
    ("retry_after", "postponed"),
    [
        ("100000000000000", 3600.0),  # 1e14 s: past any date, capped at send_give_up_hours
        ("10000000000", 3600.0),  # 1e10 s (three centuries): capped the same
        ("\u00b2", 0.05),  # a digit, but not ASCII: no usable wish, the backoff
    ],
)
def test_an_absurd_retry_after_neither_stops_the_sender_nor_parks_the_job(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    retry_after: str,
    postponed: float,
) -> None:
    fake_dicomweb.answers = [lambda uids: (503, {"Retry-After": retry_after}, None)]
    ctx = make_context(
        fake_dicomweb.destination(),
        send_retry_seconds=0.05,
        send_retry_max_seconds=0.05,
        send_give_up_hours=1.0,
    )
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING and "HTTP 503" in job.last_error
    assert postponed_for(ctx, job_id) == pytest.approx(postponed, abs=0.01)


@pytest.mark.parametrize(
    ("answer", "in_error"),
    [
        (lambda uids: (500, {}, None), "HTTP 500"),
        (lambda uids: time.sleep(1.0) or (200, {}, None), "did not answer"),
    ],
)
def test_server_errors_and_timeouts_are_retried_with_backoff(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    answer: Callable[[list[str]], Answer],
    in_error: str,
) -> None:
    fake_dicomweb.answers = [answer]
    ctx = make_context(
        fake_dicomweb.destination(), send_retry_seconds=0.2, send_retry_max_seconds=0.2
    )
    ctx.settings.send_timeout_seconds = 0.3  # the hanging server outlasts it
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING and in_error in job.last_error
    assert postponed_for(ctx, job_id) == pytest.approx(0.2, abs=0.01)
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0


def test_an_unset_credential_variable_fails_the_destination_and_names_it(
    fake_dicomweb: FakeDicomWeb,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STOW_TEST_TOKEN")
    ctx = make_context(fake_dicomweb.destination())
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["cloud"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED
    assert "environment variable STOW_TEST_TOKEN (named by token_env) is not set" in job.last_error
    assert fake_dicomweb.received == []


@pytest.mark.parametrize("trusted", [True, False])
def test_https_verifies_the_server(
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    server_certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool,
) -> None:
    cert, key = server_certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("STOW_TEST_TOKEN", TOKEN)
    fake = FakeDicomWeb(context)
    try:
        ca = {"tls_ca_file": str(cert)} if trusted else {}
        ctx = make_context(fake.destination(**ca))
        job_id, uids, _ = make_sending_job(ctx, tmp_path, ["cloud"])

        assert Sender(ctx).run_once()

        job = ctx.queries.get_job(job_id)
        if trusted:
            assert job.state == JobState.DONE, job.last_error
            assert [uid for request in fake.received for uid in request.uids] == uids
        else:  # an unknown certificate is never sent to; the job waits for a fixed config
            assert job.state == JobState.SENDING and "CERTIFICATE_VERIFY_FAILED" in job.last_error
            assert fake.received == []
    finally:
        fake.close()


# -- the pieces, without a network -------------------------------------------------------


def test_batches_respect_count_and_bytes_and_a_large_instance_goes_alone() -> None:
    parts = [Part(str(i), Path(str(i)), size) for i, size in enumerate([4, 4, 4, 20, 4, 4])]
    sizes = [[p.size for p in batch] for batch in batches(parts, max_count=2, max_bytes=10)]
    assert sizes == [[4, 4], [4], [20], [4, 4]]
    assert [len(b) for b in batches(parts, max_count=16, max_bytes=1000)] == [6]


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(http_date_in(60)) == pytest.approx(60, abs=1.5)
    assert retry_after_seconds(http_date_in(-60)) == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("\u00b2") is None  # isdigit() says yes, float() no
    assert retry_after_seconds("\u0661\u0662") is None  # Arabic-Indic 12: not HTTP
    assert retry_after_seconds("Mon, 01 Jan 99999 00:00:00 GMT") is None


def test_an_answer_counts_only_the_instances_that_were_sent() -> None:
    body = json.dumps([stow_answer(["a", "other"], {"b": 0xC122})]).encode()
    result = parse_answer(202, body, ["a", "b", "c"])
    assert result.stored == {"a": 0}
    assert result.failed == {"b": 0xC122, "c": None}  # c: not mentioned, not acknowledged
    assert parse_answer(200, b"", ["a"]).stored == {"a": 0}
    assert parse_answer(409, b"not json", ["a"]).failed == {"a": None}
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads: RecursionError, not ValueError
    assert parse_answer(409, deep, ["a"]).failed == {"a": None}
    for sequence in (5, True, "a", {"00081155": {"Value": ["a"]}}):  # a sequence not a list
        body = json.dumps({"00081199": {"Value": sequence}}).encode()
        assert parse_answer(202, body, ["a"]).failed == {"a": None}, sequence


#: JSON shaped like a STOW-RS answer, with anything where the values go.
STOW_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(["a", "b", ""]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["00081199", "00081198", "00081155", "00081196", "00081197", "Value"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=24,
)


@settings(max_examples=300, deadline=None)
@given(answer=STOW_JSON, status=st.sampled_from([200, 202, 409]))
def test_any_answer_is_read_and_each_instance_gets_one_outcome(answer: Any, status: int) -> None:
    result = parse_answer(status, json.dumps(answer).encode(), ["a", "b"])
    assert set(result.stored) | set(result.failed) == {"a", "b"}
    assert not set(result.stored) & set(result.failed)
    assert all(0 <= code <= 0xFFFF for code in result.stored.values())
    assert all(code is None or 0 <= code <= 0xFFFF for code in result.failed.values())


def test_codes_are_read_only_as_16_bit_numbers() -> None:
    def answer(tag: str, code: Any) -> bytes:
        sequence = "00081199" if tag == "00081196" else "00081198"
        item = {"00081155": {"Value": ["a"]}, tag: {"Value": [code]}}
        return json.dumps({sequence: {"Value": [item]}}).encode()

    assert parse_answer(202, answer("00081196", 0xB000), ["a"]).stored == {"a": 0xB000}
    assert parse_answer(202, answer("00081197", 0xA700), ["a"]).failed == {"a": 0xA700}
    for code in (True, 1.5, -1, 0x10000, "0", [1], 10**400):
        assert parse_answer(202, answer("00081196", code), ["a"]).failed == {"a": None}, code
        assert parse_answer(202, answer("00081197", code), ["a"]).failed == {"a": None}, code
