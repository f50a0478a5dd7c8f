"""The sender over real sockets: a real Orthanc as the PACS, and pynetdicom SCPs that
answer with chosen statuses.  Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.records import file_record
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.config import Settings
from node.context import NodeContext
from node.jobs import JobState
from node.jobs.manager import DerivedFile
from node.jobs.states import DeliveryState, EventKind
from node.sender import Sender
from node.spool import Spool
from node.store_processes import AssociationProcessError, _as_sent
from node.web.metrics import NodeCollector
from tests.fixtures.jobs import settle_series
from tests.reliability.checks import alive, wait_until

SLICES = 5
ROOT = Path(__file__).resolve().parents[1]
HOLDER = "test-worker"


@pytest.fixture
def make_context(tmp_path: Path, db_url: str) -> Iterator[Callable[..., NodeContext]]:
    """Factory: a NodeContext on this test's database with the given destinations."""
    opened: list[NodeContext] = []

    def make(destinations: dict[str, dict[str, Any]], name: str = "sender", **values: Any):
        settings = Settings(
            state_dir=tmp_path / "state",
            database_url=db_url,
            destinations=destinations,
            spool_min_free_mb=0,
            heartbeat_seconds=0.2,
            send_timeout_seconds=5.0,
            **values,
        )
        ctx = NodeContext.open(settings)
        ctx.name = name
        opened.append(ctx)
        return ctx

    yield make
    for ctx in opened:
        ctx.close()


def pacs(server: OrthancServer) -> dict[str, dict[str, Any]]:
    return {"pacs": {"ae_title": server.ae_title, "host": server.host, "port": server.dicom_port}}


def make_sending_job(
    ctx: NodeContext, tmp_path: Path, destinations: list[str]
) -> tuple[int, list[str], str]:
    """A job in ``sending`` with SLICES derived instances in the spool, made by manager verbs.

    Returns the job id, the derived SOP Instance UIDs and the derived series UID; the
    UIDs are new for every call, so tests can share one Orthanc.
    """
    manager = ctx.manager
    seed = uuid.uuid4().int % 2**32
    sources = write_phantom_series(
        tmp_path / f"source-{seed}", PhantomSpec(slices=SLICES, size=32, seed=seed)
    )
    for path in sources:
        manager.record_instance(file_record(path, f"incoming/{path.name}"))
    series_uid = dcmread(sources[0], stop_before_pixels=True).SeriesInstanceUID
    job_id = settle_series(manager, ctx.queries, series_uid, destinations=tuple(destinations))
    study_uid = ctx.queries.get_job(job_id).study_instance_uid
    job = manager.claim_next_job(HOLDER)
    assert job is not None and job.id == job_id
    derived = write_phantom_series(
        tmp_path / f"derived-{seed}",
        PhantomSpec(
            slices=SLICES,
            size=32,
            seed=seed,
            study_uid=study_uid,
            series_description="Phantom [denoised]",
            image_type=("DERIVED", "SECONDARY", "AXIAL"),
        ),
    )
    items = []
    for index, path in enumerate(derived):
        relative = Spool.derived(job_id, index)
        ctx.spool.write_atomic(relative, lambda handle, p=path: handle.write(p.read_bytes()))
        ds = dcmread(path, stop_before_pixels=True)
        items.append(DerivedFile(ds.SOPInstanceUID, "1.2.3.source", None, relative))
    manager.record_derived(job_id, HOLDER, items)
    output_uid = dcmread(derived[0], stop_before_pixels=True).SeriesInstanceUID
    manager.finish_denoising(job_id, HOLDER, output_uid, "test-model", "0", "derived")
    return job_id, [item.sop_instance_uid for item in items], output_uid


def orthanc_uids(server: OrthancServer, series_uid: str) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in server.series_instances(series_uid)}


def test_job_is_done_and_orthanc_holds_exactly_the_derived_instances(
    shared_orthanc: OrthancServer, make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    orthanc = shared_orthanc
    before = orthanc.count_instances()
    ctx = make_context(pacs(orthanc))
    job_id, uids, output_uid = make_sending_job(ctx, tmp_path, ["pacs"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.DONE, job.last_error
    assert orthanc_uids(orthanc, output_uid) == set(uids)
    assert orthanc.count_instances() - before == SLICES
    assert ctx.queries.delivery_counts(job_id) == {"pacs": SLICES}
    assert f"{SLICES} instances acknowledged by pacs" in ctx.queries.job_events(job_id)[-1].message
    assert not Sender(ctx).run_once()  # nothing left to send


def test_after_a_restart_only_the_missing_instances_are_sent(
    shared_orthanc: OrthancServer, make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    orthanc = shared_orthanc
    before = orthanc.count_instances()
    ctx = make_context(pacs(orthanc), stale_after_seconds=0.5)
    job_id, uids, output_uid = make_sending_job(ctx, tmp_path, ["pacs"])
    # A sender took the job, had two instances acknowledged, and was killed.
    crashed = ctx.manager.claim_sending_job("crashed-sender", 0.5)
    assert crashed is not None
    for uid in uids[:2]:
        ctx.manager.record_deliveries(job_id, "pacs", [(uid, 0x0000)])

    sender = Sender(ctx)
    assert not sender.run_once()  # its claim is still fresh
    time.sleep(0.6)
    assert sender.run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.DONE, job.last_error
    assert orthanc_uids(orthanc, output_uid) == set(uids[2:])
    assert orthanc.count_instances() - before == SLICES - 2
    assert "(3 sent now)" in ctx.queries.job_events(job_id)[-1].message


@pytest.mark.orthanc
def test_pacs_down_postpones_with_backoff_then_finishes(
    make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")  # down: its ports are chosen, not served
    ctx = make_context(pacs(orthanc), send_retry_seconds=0.3, send_retry_max_seconds=0.5)
    job_id, uids, output_uid = make_sending_job(ctx, tmp_path, ["pacs"])
    sender = Sender(ctx)

    delays = []
    for _ in range(2):
        assert sender.run_once()
        job = ctx.queries.get_job(job_id)
        assert job.state == JobState.SENDING
        assert "could not be reached" in job.last_error
        event = ctx.queries.job_events(job_id)[-1]
        assert event.kind == EventKind.POSTPONED
        delays.append((job.run_after - event.at).total_seconds())
        assert not sender.run_once()  # not before run_after
        time.sleep(delays[-1] + 0.05)
    assert delays == pytest.approx([0.3, 0.5])  # doubled, then capped
    assert ctx.queries.consecutive_postponements(job_id) == 2

    with orthanc:
        assert sender.run_once()
        job = ctx.queries.get_job(job_id)
        assert job.state == JobState.DONE, job.last_error
        assert orthanc_uids(orthanc, output_uid) == set(uids)


def test_unknown_destination_fails_the_job_with_a_clear_error(
    shared_orthanc: OrthancServer, make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    orthanc = shared_orthanc
    before = orthanc.count_instances()
    ctx = make_context(pacs(orthanc))
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["pacs", "nowhere"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED
    assert "unknown destination 'nowhere' (configured: pacs)" in job.last_error
    assert orthanc.count_instances() - before == SLICES  # the known destination still got its copy


class StatusSCP:
    """A pynetdicom Storage SCP that answers every C-STORE with ``status``."""

    def __init__(self, transfer_syntaxes: list[str], ssl_context: ssl.SSLContext | None) -> None:
        self.status = 0x0000
        self.on_store: Callable[[], None] | None = None
        self.received: list[str] = []
        self.associations: list[int] = []  # which association stored each instance
        self.status_of: dict[str, int] = {}  # a status of its own for these instances
        self.port = free_port()
        self.tls = ssl_context is not None
        ae = AE(ae_title="STATUSSCP")
        ae.add_supported_context(CTImageStorage, transfer_syntaxes)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
            ssl_context=ssl_context,
        )

    def _handle_store(self, event: evt.Event) -> int:
        self.received.append(event.request.AffectedSOPInstanceUID)
        self.associations.append(id(event.assoc))
        if self.on_store is not None:
            self.on_store()
        return self.status_of.get(event.request.AffectedSOPInstanceUID, self.status)

    def wait_for_associations(self, count: int, seconds: float = 10.0) -> None:
        """Until ``count`` associations are open at once (or ``seconds`` pass)."""
        deadline = time.monotonic() + seconds
        while len(self._server.active_associations) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def abort_associations(self) -> None:
        """A-ABORT every association it holds, as a PACS restarting or out of memory does."""
        for assoc in self._server.active_associations:
            assoc.abort()

    def destination(self, associations: int = 1) -> dict[str, dict[str, Any]]:
        """One association unless asked: most tests follow the instances in order."""
        peer = {"ae_title": "STATUSSCP", "host": "127.0.0.1", "port": self.port, "tls": self.tls}
        return {"scp": {**peer, "associations": associations}}

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="session")
def scp_servers() -> Iterator[dict[tuple[tuple[str, ...], bool], StatusSCP]]:
    """SCPs shared by the session (stopping one takes a second), one per kind."""
    servers: dict[tuple[tuple[str, ...], bool], StatusSCP] = {}
    yield servers
    for scp in servers.values():
        scp.close()


@pytest.fixture
def status_scp(
    scp_servers: dict[tuple[tuple[str, ...], bool], StatusSCP],
) -> Callable[..., StatusSCP]:
    """Factory: an SCP answering ``status``, with nothing received yet."""

    def make(
        status: int,
        transfer_syntaxes: list[str] | None = None,
        on_store: Callable[[], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> StatusSCP:
        syntaxes = tuple(transfer_syntaxes or [ExplicitVRLittleEndian])
        key = (syntaxes, ssl_context is not None)
        if key not in scp_servers:
            scp_servers[key] = StatusSCP(list(syntaxes), ssl_context)
        scp = scp_servers[key]
        scp.status, scp.on_store, scp.received, scp.associations = status, on_store, [], []
        scp.status_of = {}
        return scp

    return make


@pytest.mark.parametrize(
    ("status", "state", "in_error"),
    [
        (0xA700, JobState.SENDING, "status 0xA700"),  # out of resources: try later
        (0xA900, JobState.FAILED, "status 0xA900"),  # data set does not match SOP class
        (0xC123, JobState.FAILED, "status 0xC123"),  # cannot understand
        (0xB000, JobState.DONE, None),  # warning: stored, counts as acknowledged
    ],
)
def test_store_status_decides_retry_or_failure(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    status: int,
    state: JobState,
    in_error: str | None,
) -> None:
    scp = status_scp(status)
    ctx = make_context(scp.destination(), send_retry_seconds=0.01, send_retry_max_seconds=0.01)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])
    sender = Sender(ctx)
    attempts = ctx.settings.send_max_attempts if state == JobState.FAILED else 1

    for _ in range(attempts):  # a refusal fails the destination after send_max_attempts
        time.sleep(0.05)  # past the backoff
        assert sender.run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == state
    if in_error:
        assert in_error in job.last_error and "STATUSSCP answered" in job.last_error
        assert len(scp.received) == attempts  # each attempt stops at the first refusal
    else:
        assert scp.received == uids
    if state == JobState.FAILED:
        assert f"refused {attempts} time(s)" in job.last_error
        assert [d.state for d in ctx.queries.destinations(job_id)] == [DeliveryState.FAILED]


def test_instances_go_out_without_waiting_for_delayed_acknowledgements(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TCP_NODELAY on the sender's connection while it sends, as storescu sets it (seen
    from an association in this process: a ``ThreadLink``, which an association process
    runs as well)."""
    opened: list[Any] = []
    associate = AE.associate

    def keep(ae: AE, *args: Any, **kwargs: Any) -> Any:
        opened.append(associate(ae, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(AE, "associate", keep)
    no_delay: list[int] = []

    def look_at_the_sender() -> None:  # at each C-STORE, while the connection is open
        connection = opened[-1].dul.socket.socket
        no_delay.append(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    scp = status_scp(0x0000, on_store=look_at_the_sender)
    ctx = make_context(scp.destination(), send_in_processes=False)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert len(no_delay) == len(uids) and all(no_delay)


def test_instances_are_spread_over_the_destinations_associations(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    """Each instance once, over as many associations as the destination asks for."""
    scp = status_scp(0x0000, on_store=lambda: time.sleep(0.3))  # a slow PACS: all 3 busy
    ctx = make_context(scp.destination(associations=3))
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert sorted(scp.received) == sorted(uids)
    assert len(set(scp.associations)) == 3
    assert ctx.queries.delivery_counts(job_id) == {"scp": SLICES}


def test_a_peer_that_takes_one_association_gets_every_instance_over_it(
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PACS limiting associations per calling AE rejects the extra ones (local limit
    exceeded): the sender goes on over the one it got."""
    received: list[str] = []
    peer = AE(ae_title="ONLYONE")
    peer.maximum_associations = 1
    peer.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])

    def store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.1)  # still busy with the first association when the others ask
        return 0x0000

    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    try:
        destination = {"ae_title": "ONLYONE", "host": "127.0.0.1", "port": port}
        ctx = make_context({"pacs": {**destination, "associations": 4}})
        job_id, uids, _ = make_sending_job(ctx, tmp_path, ["pacs"])
        with caplog.at_level(logging.INFO, logger="node.c_store_client"):
            assert Sender(ctx).run_once()
    finally:
        server.shutdown()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert received == uids
    assert caplog.text.count("an association of the 4 asked for was not opened") == 3


def test_a_refusal_stops_every_association_after_its_instance_in_flight(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    """The first instance is refused on the first association; the second association,
    busy with its own first instance meanwhile, takes no other."""
    scp = status_scp(0x0000, on_store=lambda: time.sleep(0.2))
    ctx = make_context(scp.destination(associations=2))
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])
    scp.status_of = {uids[0]: 0xA900}

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert f"STATUSSCP answered status 0xA900 to the C-STORE of {uids[0]}" in job.last_error
    assert scp.received[0] == uids[0] and len(scp.received) <= 2, scp.received
    assert ctx.queries.delivery_counts(job_id) in ({}, {"scp": 1})


def test_implicit_only_peer_gets_the_explicit_files_converted(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    scp = status_scp(0x0000, [ImplicitVRLittleEndian])
    ctx = make_context(scp.destination())
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert scp.received == uids


def test_stop_releases_the_job_between_instances(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    stop = threading.Event()
    scp = status_scp(0x0000, on_store=stop.set)  # SIGTERM arrives during the first C-STORE
    ctx = make_context(scp.destination())
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    Sender(ctx, stop).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING and job.claimed_by is None
    assert "released" in ctx.queries.job_events(job_id)[-1].message
    assert ctx.queries.delivery_counts(job_id) == {"scp": 1}
    assert scp.received == uids[:1]


def test_a_peer_abort_between_two_instances_is_tried_again_not_fatal(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pynetdicom refuses a C-STORE on an aborted association with a RuntimeError: the
    destination's failure is transient, and the send role goes on."""
    opened: list[Any] = []
    associate = AE.associate

    def keep(ae: AE, *args: Any, **kwargs: Any) -> Any:
        opened.append(associate(ae, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(AE, "associate", keep)
    scp = status_scp(0x0000)
    ctx = make_context(
        scp.destination(),
        send_retry_seconds=0.01,
        send_retry_max_seconds=0.01,
        send_in_processes=False,  # the test watches the association from this process
    )
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])
    record = ctx.manager.record_deliveries

    def record_then_the_peer_aborts(*args: Any) -> None:
        record(*args)
        if len(opened) == 1:  # the first association only, after its first instance
            scp.abort_associations()
            wait_until(lambda: not opened[0].is_established, 10, "the abort to arrive")

    monkeypatch.setattr(ctx.manager, "record_deliveries", record_then_the_peer_aborts)
    sender = Sender(ctx)

    assert sender.run_once()
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING
    assert f"association aborted before the C-STORE of {uids[1]}" in job.last_error
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
    assert ctx.queries.delivery_counts(job_id) == {"scp": 1}

    time.sleep(0.05)  # past the backoff
    assert sender.run_once()
    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert scp.received == uids  # the rest once, on a new association


def test_an_unforeseen_error_in_one_destination_is_transient_and_logged_with_its_traceback(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A derived file cut inside its file meta makes pynetdicom raise struct.error, which
    no one foresaw: the send role goes on, the job is tried again after the backoff."""
    scp = status_scp(0x0000)
    ctx = make_context(scp.destination())
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])
    third = ctx.spool.path(ctx.queries.derived_instances(job_id)[2].spool_path)
    # preamble and DICM (132), (0002,0000) UL (12), then (0002,0001)'s header cut short
    third.write_bytes(third.read_bytes()[:152])

    with caplog.at_level(logging.ERROR, logger="node.sender"):
        assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.SENDING
    assert "unexpected struct.error while sending" in job.last_error
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
    assert ctx.queries.delivery_counts(job_id) == {"scp": 2} and scp.received == uids[:2]
    (record,) = [r for r in caplog.records if "unexpected struct.error" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is struct.error


@pytest.fixture(scope="session")
def server_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
def test_tls_destination_verifies_the_peer(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    server_certificate: tuple[Path, Path],
    trusted: bool,
) -> None:
    cert, key = server_certificate
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    scp = status_scp(0x0000, ssl_context=server)
    ctx = make_context(scp.destination(), tls_ca_file=cert if trusted else None)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    assert Sender(ctx).run_once()

    job = ctx.queries.get_job(job_id)
    if trusted:
        assert job.state == JobState.DONE, job.last_error
        assert scp.received == uids
    else:  # an unknown certificate is never sent to; the job waits for a fixed config
        assert job.state == JobState.SENDING and "could not be reached" in job.last_error
        assert scp.received == []


def test_a_job_cancelled_while_sending_stops_at_the_next_heartbeat(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    scp = status_scp(0x0000)
    ctx = make_context(scp.destination())
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    def cancel_during_first_store() -> None:
        scp.on_store = None
        ctx.manager.cancel_job(job_id, "admin")
        time.sleep(0.3)  # longer than heartbeat_seconds: the next instance heartbeats

    scp.on_store = cancel_during_first_store

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.CANCELLED
    assert scp.received == uids[:1]


@pytest.fixture
def refusing_storescp() -> Iterator[dict[str, dict[str, Any]]]:
    """DCMTK storescp that answers every association with A-ASSOCIATE-RJ (rejected-permanent)."""
    port = free_port()
    process = subprocess.Popen(
        [dcmtk_tool("storescp"), "--refuse", "-aet", "REFUSER", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield {"refuser": {"ae_title": "REFUSER", "host": "127.0.0.1", "port": port}}
    finally:
        process.terminate()
        process.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def metric_value(ctx: NodeContext, name: str, labels: dict[str, str]) -> float:
    (family,) = [f for f in NodeCollector(ctx, list).collect() if f.name == name]
    (sample,) = [s for s in family.samples if s.labels == labels]
    return sample.value


class AeCheckingOrthanc(OrthancServer):
    """Orthanc that rejects an association addressed to another called AE title."""

    def config(self) -> dict[str, Any]:
        return super().config() | {"DicomCheckCalledAet": True}


@pytest.fixture
def wrong_called_ae(tmp_path: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """A destination whose AE title the Orthanc at its address does not answer to."""
    with AeCheckingOrthanc(tmp_path / "orthanc") as orthanc:
        yield {
            "refuser": {"ae_title": "NOT-ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        }


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        ("refusing_storescp", "Rejected Permanent"),
        ("wrong_called_ae", "Called AE title not recognised"),
    ],
)
def test_a_permanently_rejected_association_fails_the_destination_after_max_attempts(
    peer: str,
    reason: str,
    request: pytest.FixtureRequest,
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    destinations = request.getfixturevalue(peer)
    ctx = make_context(destinations, send_retry_seconds=0.01, send_retry_max_seconds=0.01)
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["refuser"])
    sender = Sender(ctx)
    for _ in range(ctx.settings.send_max_attempts):
        time.sleep(0.05)  # past the backoff
        assert sender.run_once()
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.attempts == ctx.settings.send_max_attempts
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED
    assert "rejected the association" in job.last_error and reason in job.last_error
    assert "refused 3 time(s)" in job.last_error
    assert delivery.state == DeliveryState.FAILED
    assert any(e.kind == EventKind.GAVE_UP for e in ctx.queries.job_events(job_id))
    labels = {"destination": "refuser", "state": "failed"}
    assert metric_value(ctx, "denoise_node_job_destinations", labels) == 1

    ctx.manager.resend_job(job_id, "refuser", "admin")  # `jobs resend ID --to refuser`
    (delivery,) = ctx.queries.destinations(job_id)
    assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)
    assert ctx.queries.get_job(job_id).state == JobState.SENDING


def test_an_unreachable_destination_is_given_up_after_send_give_up_hours(
    make_context: Callable[..., NodeContext], tmp_path: Path
) -> None:
    nobody = {"nobody": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port()}}
    ctx = make_context(
        nobody,
        send_retry_seconds=0.05,
        send_retry_max_seconds=0.05,
        send_give_up_hours=0.5 / 3600,
    )
    job_id, _, _ = make_sending_job(ctx, tmp_path, ["nobody"])
    sender = Sender(ctx)
    tries = 0
    deadline = time.monotonic() + 30
    while ctx.queries.get_job(job_id).state == JobState.SENDING and time.monotonic() < deadline:
        tries += sender.run_once()
        time.sleep(0.06)
    job = ctx.queries.get_job(job_id)
    assert job.state == JobState.FAILED
    assert tries > 1, "transient failures are retried before giving up"
    assert "could not be reached" in job.last_error and "gave up" in job.last_error
    (delivery,) = ctx.queries.destinations(job_id)
    assert delivery.state == DeliveryState.FAILED and delivery.attempts == 0


@pytest.mark.parametrize("in_processes", [True, False])
def test_associations_run_in_processes_of_their_own_unless_told_otherwise(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_processes: bool,
) -> None:
    """``send_in_processes`` (the default): no association is opened in the sender's own
    process, and every instance still arrives once, over the two associations asked for."""
    opened_here: list[int] = []
    associate = AE.associate

    def count(ae: AE, *args: Any, **kwargs: Any) -> Any:
        opened_here.append(1)
        return associate(ae, *args, **kwargs)

    monkeypatch.setattr(AE, "associate", count)
    scp = status_scp(0x0000)
    # The first C-STORE is answered once the second association is open too: however
    # slowly its process starts, instances are left for it.
    scp.on_store = lambda: scp.wait_for_associations(2)
    ctx = make_context(scp.destination(associations=2), send_in_processes=in_processes)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert sorted(scp.received) == sorted(uids) and len(set(scp.associations)) == 2
    assert len(opened_here) == (0 if in_processes else 2)


def test_a_killed_association_process_is_a_transient_failure_and_the_rest_goes_later(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
) -> None:
    """The association's process dies during the second C-STORE (OOM killer, a crash in
    a library): the first acknowledgement is recorded, the attempt is a transient failure
    that names the exit, and the next attempt sends what is missing."""
    killed: list[int] = []

    def kill_the_sending_process() -> None:
        if len(scp.received) == 2:
            children = [p for p in multiprocessing.active_children() if p.name == "c-store-scp"]
            for child in children:
                os.kill(child.pid or 0, signal.SIGKILL)
                killed.append(child.pid or 0)

    scp = status_scp(0x0000, on_store=kill_the_sending_process)
    ctx = make_context(scp.destination(), send_retry_seconds=0.01, send_retry_max_seconds=0.01)
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])
    sender = Sender(ctx)

    assert sender.run_once()
    job = ctx.queries.get_job(job_id)
    assert len(killed) == 1 and job.state == JobState.SENDING
    assert f"association process ended (exit code -9) during the C-STORE of {uids[1]}" in (
        job.last_error
    )
    assert ctx.queries.delivery_counts(job_id) == {"scp": 1}

    time.sleep(0.05)  # past the backoff
    assert sender.run_once()
    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert set(scp.received) == set(uids) and scp.received.count(uids[1]) == 2


def test_an_association_process_ends_when_the_node_process_is_killed(
    status_scp: Callable[..., StatusSCP], tmp_path: Path
) -> None:
    """kill -9 of the node's process in the middle of a C-STORE: its association process
    finishes that instance and exits (its pipe closed) instead of living on."""
    scp = status_scp(0x0000, on_store=lambda: time.sleep(0.2))
    (path,) = write_phantom_series(tmp_path / "one", PhantomSpec(slices=1, size=32))
    program = f"""
from pathlib import Path
from node.config import Settings
from node.store_processes import ProcessLink, start_association_server
if __name__ == "__main__":
    start_association_server()
    settings = Settings(destinations={scp.destination()!r})
    link = ProcessLink(settings, "scp", settings.destinations["scp"])
    print(link.pid, flush=True)
    while True:
        link.store("1.2.3", Path({str(path)!r}))
"""
    node = subprocess.Popen(
        [sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert node.stdout is not None
        child = int(node.stdout.readline())
        wait_until(lambda: len(scp.received) >= 2, 20, "the association process to send")
        assert alive(child)
    finally:
        node.kill()
        node.wait()
    wait_until(lambda: not alive(child), 10, "the association process to exit")


def test_a_process_that_never_released_its_association_still_exits(
    status_scp: Callable[..., StatusSCP], tmp_path: Path
) -> None:
    """multiprocessing joins its children at the interpreter's exit, without a limit: an
    association left open by a failing caller must not keep the process alive."""
    scp = status_scp(0x0000)
    (path,) = write_phantom_series(tmp_path / "one", PhantomSpec(slices=1, size=32))
    script = tmp_path / "leave_it_open.py"
    script.write_text(
        f"""
from pathlib import Path
from node.config import Settings
from node.store_processes import ProcessLink, start_association_server
if __name__ == "__main__":
    start_association_server()
    settings = Settings(destinations={scp.destination()!r})
    link = ProcessLink(settings, "scp", settings.destinations["scp"])
    print(link.store("1.2.3", Path({str(path)!r}))[0], flush=True)
"""
    )
    run = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (run.returncode, run.stdout.strip()) == (0, "0"), run.stderr
    assert len(scp.received) == 1


def test_an_exception_is_sent_back_as_itself_only_where_it_survives_the_pipe() -> None:
    """A child's unforeseen exception comes back as raised where pickling rebuilds it, else
    as an AssociationProcessError naming it (never a TypeError from rebuilding it)."""

    class TwoArguments(Exception):
        def __init__(self, code: int, where: str) -> None:
            super().__init__(f"{code} at {where}")

    cut = struct.error("unpack requires a buffer of 4 bytes")
    assert _as_sent(cut) is cut
    replaced = _as_sent(TwoArguments(7, "the file meta"))
    assert isinstance(replaced, AssociationProcessError)
    assert "TwoArguments: 7 at the file meta" in str(replaced)


def test_associations_run_in_threads_where_no_process_can_start(
    status_scp: Callable[..., StatusSCP],
    make_context: Callable[..., NodeContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fork server's socket is gone (a /tmp cleaner): each association runs in the send
    role's process instead, with a warning, and the job is done."""

    def no_server(*_args: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(forkserver, "connect_to_new_process", no_server)
    scp = status_scp(0x0000)
    ctx = make_context(scp.destination(associations=2))
    job_id, uids, _ = make_sending_job(ctx, tmp_path, ["scp"])

    with caplog.at_level(logging.WARNING, logger="node.store_processes"):
        assert Sender(ctx).run_once()

    assert ctx.queries.get_job(job_id).state == JobState.DONE
    assert sorted(scp.received) == sorted(uids)
    warnings = [
        r.getMessage() for r in caplog.records if "no process for an association" in r.getMessage()
    ]
    assert len(warnings) == 2 and "FileNotFoundError" in warnings[0]
