"""Storage commitment over real sockets: Orthanc's storage commitment SCP reports to the
node process; a pynetdicom PACS that never reports, or reports instances as failed;
a report with an unknown Transaction UID.  Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt

# Made at import time, so mypy cannot see it.
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from devtools.orthanc import OrthancServer
from devtools.tools import free_port
from node.cli import main
from node.commitment import STORAGE_COMMITMENT_INSTANCE
from node.config import Settings, load_settings
from node.context import NodeContext
from node.jobs import JobState
from node.jobs.states import DeliveryState, EventKind
from node.receiver import Receiver
from node.sender import Sender
from node.web import create_app
from tests.fixtures.dicom import storescu
from tests.reliability.checks import wait_until
from tests.test_sender import make_sending_job

PROCESSING_FAILURE = 0x0110


def committing(ae_title: str, port: int, **timers: float) -> dict[str, dict[str, Any]]:
    return {
        "pacs": {
            "ae_title": ae_title,
            "host": "127.0.0.1",
            "port": port,
            "storage_commitment": True,
            **timers,
        }
    }


def test_orthanc_commits_the_derived_series_and_the_job_is_done(
    node_factory: Callable[..., Any],
    tmp_path: Path,
    phantom_series: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    with OrthancServer(tmp_path / "orthanc", node=("DENOISE", "127.0.0.1", port)) as orthanc:
        node = node_factory(
            port=port,
            destinations=committing(orthanc.ae_title, orthanc.dicom_port),
        ).start()
        assert storescu(node.port, phantom_series) == [0] * len(phantom_series)
        (job,) = node.wait_jobs_final(1)
        assert job.state == JobState.DONE, job.last_error
        held = orthanc.series_instances(str(job.output_series_uid))
        assert len(held) == len(phantom_series)
        (pacs,) = node.queries.destinations(job.id)
        assert pacs.state == DeliveryState.COMMITTED
        assert pacs.commitment_uid is not None and pacs.commitment_requested_at is not None
        events = node.queries.job_events(job.id)
        kinds = [event.kind for event in events]
        assert kinds.count(EventKind.COMMITMENT) == 2  # requested, then committed
        assert any(pacs.commitment_uid in event.message for event in events)
        assert "committed by pacs" in (events[-1].message or "")

        # What an operator sees: `denoise-node status` and the dashboard.
        assert main(["--config", str(node.config), "status"]) == 0
        out = capsys.readouterr().out
        assert "jobs: committed 1 (storage commitment asked)" in out
        ctx = NodeContext.open(load_settings(node.config))
        try:
            dashboard = TestClient(create_app(ctx), base_url="http://127.0.0.1").get("/")
        finally:
            ctx.close()
        assert "committed 1 · awaiting 0" in dashboard.text


class CommitmentPACS:
    """A pynetdicom PACS: stores CT, answers N-ACTION, and reports as told.

    ``report`` maps the N-ACTION's instances to the ones reported as failed (None: no
    report at all); the report goes on a new association to ``node_port``, as Orthanc's,
    or with ``same_association`` on the N-ACTION's own, before its response.
    """

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.port = free_port()
        self.stored: list[str] = []
        self.requests: list[str] = []
        self.report: Callable[[list[str]], list[str]] | None = None
        self.same_association = False
        self.statuses: list[int] = []
        self._reporters: list[threading.Thread] = []
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(StorageCommitmentPushModel)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        uids = [str(item.ReferencedSOPInstanceUID) for item in info.ReferencedSOPSequence]
        self.requests.append(str(info.TransactionUID))
        if self.report is None:
            return 0x0000, None
        report = _report(str(info.TransactionUID), uids, self.report(uids))
        if self.same_association:
            # From another thread: this one must not block the association's reactor.
            def on_this_association() -> None:
                status, _ = event.assoc.send_n_event_report(*report)
                self.statuses.append(int(status.Status))

            thread = threading.Thread(target=on_this_association)
            thread.start()
            thread.join(10)
            return 0x0000, None
        self._reporters.append(threading.Thread(target=self._send_report, args=(report,)))
        self._reporters[-1].start()
        return 0x0000, None

    def _send_report(self, report: tuple[Dataset, int, str, str]) -> None:
        time.sleep(0.1)  # after the N-ACTION response, as an asynchronous SCP does
        self.statuses.append(send_report(self.node_port, report))

    def reports_sent(self) -> list[int]:
        """The node's answers to the reports, once every report has been answered."""
        for thread in self._reporters:
            thread.join(10)
        return self.statuses

    def abort_associations(self) -> None:
        """A-ABORT every association it holds, as a PACS restarting or out of memory does."""
        for assoc in self._server.active_associations:
            assoc.abort()

    def close(self) -> None:
        self._server.shutdown()


def send_report(port: int, report: tuple[Dataset, int, str, str], propose_role: bool = True) -> int:
    """One N-EVENT-REPORT to the node, as the SCP of the class (proposed by role
    selection, or not at all, as some PACS do); the status the node answers."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(StorageCommitmentPushModel, ExplicitVRLittleEndian)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    extended = [role] if propose_role else []
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISE", ext_neg=extended)
    assert assoc.is_established
    status, _ = assoc.send_n_event_report(*report)
    assoc.release()
    return int(status.Status)


def _report(transaction: str, uids: list[str], failed: list[str]) -> tuple[Dataset, int, str, str]:
    """The arguments of a storage commitment N-EVENT-REPORT (event type 2 with failures)."""
    info = Dataset()
    info.TransactionUID = transaction
    info.ReferencedSOPSequence = Sequence([_reference(uid) for uid in uids if uid not in failed])
    if failed:
        info.FailedSOPSequence = Sequence([_reference(uid, 0x0110) for uid in failed])
    event_type = 2 if failed else 1
    return info, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE


def _reference(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[Callable[..., tuple[NodeContext, Receiver]]]:
    """Factory: the node's context (sender name ``sender``) and its running receiver."""
    made: list[tuple[NodeContext, Receiver]] = []

    def make(destinations: dict[str, dict[str, Any]], port: int) -> tuple[NodeContext, Receiver]:
        settings = Settings(
            state_dir=tmp_path / "state",
            database_url=db_url,
            bind_address="127.0.0.1",
            port=port,
            destinations=destinations,
            spool_min_free_mb=0,
            send_timeout_seconds=5.0,
            send_retry_seconds=0.1,
        )
        ctx = NodeContext.open(settings)
        ctx.name = "sender"
        receiver = Receiver(ctx)
        receiver.start()
        made.append((ctx, receiver))
        return ctx, receiver

    yield make
    for ctx, receiver in made:
        receiver.stop()
        ctx.close()


@pytest.fixture
def pacs_for() -> Iterator[Callable[[int], CommitmentPACS]]:
    peers: list[CommitmentPACS] = []

    def make(node_port: int) -> CommitmentPACS:
        peers.append(CommitmentPACS(node_port))
        return peers[-1]

    yield make
    for peer in peers:
        peer.close()


def send_until_final(ctx: NodeContext, job_id: int, timeout: float = 30.0) -> JobState:
    """Run the sender as ``node.service`` does until the job is final."""
    sender = Sender(ctx, threading.Event())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = JobState(ctx.queries.get_job(job_id).state)
        if state in (JobState.DONE, JobState.FAILED):
            return state
        if not sender.run_once():
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} not final after {timeout} s")


def test_a_report_that_never_comes_fails_the_destination_after_the_timeout(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
) -> None:
    port = free_port()
    pacs = pacs_for(port)  # answers N-ACTION, never reports
    # 2 s leave room for a second request 0.3 s after the first even when one request's
    # association takes most of a second on a busy machine (1 s failed once in CI).
    timers = {"commitment_timeout_seconds": 2.0, "commitment_retry_seconds": 0.3}
    ctx, _ = node(committing("PACS", pacs.port, **timers), port)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["pacs"])

    assert send_until_final(ctx, job_id) == JobState.FAILED
    assert sorted(pacs.stored) == sorted(uids)
    assert len(pacs.requests) >= 2  # asked again before giving up
    assert len(set(pacs.requests)) == 1  # one transaction: a late report still counts
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.FAILED
    assert (
        f"no storage commitment report from PACS within 2 s (transaction {pacs.requests[0]})"
        in (state.reason or "")
    )
    assert "no storage commitment report" in (ctx.queries.get_job(job_id).last_error or "")


def test_a_report_after_the_timeout_still_commits_and_the_job_is_done(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
) -> None:
    port = free_port()
    pacs = pacs_for(port)  # answers N-ACTION, reports only when the test sends it
    timers = {"commitment_timeout_seconds": 0.5, "commitment_retry_seconds": 0.3}
    ctx, _ = node(committing("PACS", pacs.port, **timers), port)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["pacs"])
    assert send_until_final(ctx, job_id) == JobState.FAILED

    transaction = pacs.requests[0]
    assert send_report(port, _report(transaction, uids[1:], [])) == 0x0000
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.FAILED, "a report missing an instance changes nothing"

    assert send_report(port, _report(transaction, uids, [])) == 0x0000
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.COMMITTED and state.reason is None
    assert ctx.queries.get_job(job_id).state == JobState.SENDING
    assert send_until_final(ctx, job_id) == JobState.DONE
    job = ctx.queries.get_job(job_id)
    assert job.last_error is None and job.finished_at is not None
    late = [e.message for e in ctx.queries.job_events(job_id) if "after it had failed" in e.message]
    assert len(late) == 1 and "no storage commitment report from PACS" in late[0]


def test_instances_reported_failed_are_resent_once_then_the_destination_fails(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
) -> None:
    port = free_port()
    pacs = pacs_for(port)
    pacs.report = lambda uids: uids[:1]  # the first instance is never committed
    ctx, _ = node(committing("PACS", pacs.port), port)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["pacs"])

    assert send_until_final(ctx, job_id) == JobState.FAILED
    assert sorted(pacs.stored) == sorted([*uids, uids[0]])  # everything once, the failed twice
    assert len(set(pacs.requests)) == 2  # a new transaction after the resend
    assert pacs.reports_sent() == [0x0000, 0x0000]
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.FAILED
    assert f"did not commit 1 of {len(uids)} instances" in (state.reason or "")
    assert "failure reasons 0x0110" in (state.reason or "")
    assert "after sending them once more" in (state.reason or "")


def test_a_failed_instance_committed_after_its_resend_makes_the_job_done(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
) -> None:
    port = free_port()
    pacs = pacs_for(port)
    rounds: list[int] = []

    def first_round_fails(uids: list[str]) -> list[str]:
        rounds.append(1)
        return uids[:1] if len(rounds) == 1 else []

    pacs.report = first_round_fails
    ctx, _ = node(committing("PACS", pacs.port), port)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["pacs"])

    assert send_until_final(ctx, job_id) == JobState.DONE
    assert sorted(pacs.stored) == sorted([*uids, uids[0]])
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.COMMITTED
    assert state.commitment_resends == 1


def test_a_report_on_the_request_association_commits_too(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
) -> None:
    port = free_port()
    pacs = pacs_for(port)
    pacs.report, pacs.same_association = (lambda uids: []), True
    ctx, receiver = node(committing("PACS", pacs.port), port)
    receiver.stop()  # nothing could arrive on a new association
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["pacs"])

    assert send_until_final(ctx, job_id) == JobState.DONE
    assert pacs.statuses == [0x0000]
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.COMMITTED


def test_a_peer_abort_before_the_commitment_request_asks_again_later(
    node: Callable[..., tuple[NodeContext, Receiver]],
    pacs_for: Callable[[int], CommitmentPACS],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The PACS aborts the commitment association right after accepting it: pynetdicom's
    N-ACTION raises RuntimeError; the request goes again, the send role goes on."""
    port = free_port()
    pacs = pacs_for(port)
    pacs.report = lambda uids: []
    ctx, _ = node(committing("PACS", pacs.port, commitment_retry_seconds=0.3), port)
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["pacs"])
    connect = Sender._connect_for_commitment
    aborted: list[Any] = []

    def connect_then_the_peer_aborts(sender: Sender, *args: Any) -> Any:
        assoc = connect(sender, *args)
        if assoc is not None and not aborted:
            aborted.append(assoc)
            pacs.abort_associations()
            wait_until(lambda: not assoc.is_established, 10, "the abort to arrive")
        return assoc

    monkeypatch.setattr(Sender, "_connect_for_commitment", connect_then_the_peer_aborts)

    with caplog.at_level(logging.WARNING, logger="node.commitment"):
        assert send_until_final(ctx, job_id) == JobState.DONE

    assert aborted and len(pacs.requests) == 1  # the aborted request never reached it
    (state,) = ctx.queries.destinations(job_id)
    assert state.state == DeliveryState.COMMITTED and state.commitment_uid == pacs.requests[0]
    assert any("got no answer; asked again" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("propose_role", [True, False])
def test_a_report_with_an_unknown_transaction_uid_is_refused_and_logged(
    node: Callable[..., tuple[NodeContext, Receiver]],
    caplog: pytest.LogCaptureFixture,
    propose_role: bool,
) -> None:
    port = free_port()
    node({}, port)
    unknown = generate_uid()
    with caplog.at_level(logging.WARNING, logger="node.commitment"):
        status = send_report(port, _report(unknown, [generate_uid()], []), propose_role)
    assert status == PROCESSING_FAILURE
    assert any(
        "unknown transaction" in record.getMessage() and unknown in record.getMessage()
        for record in caplog.records
    )
