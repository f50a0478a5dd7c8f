"""Nobody can block, exhaust or fool the DICOM listener.

Hostile callers over real sockets (trickled A-ASSOCIATE-RQs, P-DATA before any
association, idle connections, from an allowed and from a refused address) must not
keep a scanner out; a PDU whose header claims 300 MiB is aborted before its body is
read; C-STOREs cut off mid-stream leave no temporary file.  Figures are printed.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from node.jobs import JobState
from tests.fixtures.dicom import storescu
from tests.reliability.checks import pacs, series_uid, wait_series_done

SCANNER = "127.0.0.1"
ALLOWED_STRANGER = "127.0.0.2"
REFUSED_STRANGER = "127.0.0.3"
HOSTILE = 50
RUNS = 3
SLICES = 48
#: A P-DATA-TF PDU with one small PDV: what a confused or hostile caller sends first.
P_DATA = bytes([0x04, 0, 0, 0, 0, 10, 0, 0, 0, 6, 1, 0x03, 1, 2, 3, 4])
#: The start of an A-ASSOCIATE-RQ claiming 200 bytes (protocol version 1, reserved)
ASSOCIATE_START = bytes([0x01, 0, 0, 0, 0, 200, 0, 1, 0, 0])

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class HostileCallers:
    """Connections that hold what they can: one thread each, reconnecting when dropped."""

    BEHAVIOURS = ("trickle", "p-data", "idle")

    def __init__(self, port: int, sources: list[str], count: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.answers: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(sources[i % len(sources)], self.BEHAVIOURS[i % 3]),
                daemon=True,
            )
            for i in range(count)
        ]

    def __enter__(self) -> HostileCallers:
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)  # let them take what they can before the scanner comes
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self, source: str, behaviour: str) -> None:
        while not self.stop.is_set():
            try:
                with socket.socket() as sock:
                    # Without it, this port's TIME_WAIT would keep later listeners off it.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((source, 0))
                    sock.settimeout(0.2)
                    sock.connect(("127.0.0.1", self.port))
                    answer = self._hold(sock, behaviour)
            except OSError:
                answer = "reset"  # sent into a connection the node had closed
            with self._lock:
                self.answers[(source, answer)] += 1
            self.stop.wait(0.1)

    def _hold(self, sock: socket.socket, behaviour: str) -> str:
        """Behave until the node closes the connection; what it answered first."""
        sent = 0
        while not self.stop.is_set():
            if behaviour == "trickle" and sent < len(ASSOCIATE_START):
                sock.send(ASSOCIATE_START[sent : sent + 1])
                sent += 1
            elif behaviour == "p-data" and sent == 0:
                sock.send(P_DATA)
                sent = 1
            try:
                data = sock.recv(64)
            except TimeoutError:
                continue
            return (
                {0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}.get(data[0], "other")
                if data
                else "closed"
            )
        return "held"


@pytest.mark.parametrize("run", range(RUNS))
def test_hostile_connections_do_not_keep_a_scanner_out(
    node_factory, shared_orthanc: OrthancServer, tmp_path: Path, db_url: str, run: int
) -> None:
    node = node_factory(
        destinations=pacs(shared_orthanc),
        allowed_addresses=[SCANNER, ALLOWED_STRANGER],
        association_request_timeout_seconds=1.0,
        idle_timeout_seconds=2.0,
    ).start()
    series = write_phantom_series(
        tmp_path / "series",
        PhantomSpec(slices=SLICES, size=64, seed=500 + run, series_description=f"Run {run}"),
    )
    started = time.monotonic()
    with HostileCallers(node.port, [ALLOWED_STRANGER, REFUSED_STRANGER], HOSTILE) as hostile:
        assert storescu(node.port, series) == [0] * SLICES
        stored = time.monotonic() - started
        job = wait_series_done(node, series_uid(series[0]), SLICES)
    assert job.state == JobState.DONE, job.last_error
    assert len(shared_orthanc.series_instances(job.output_series_uid)) == SLICES
    print(
        f"run {run}: {SLICES} slices stored in {stored:.1f} s beside {HOSTILE} hostile "
        f"connections; their answers: {dict(hostile.answers)}"
    )
    answers = hostile.answers
    assert answers[(REFUSED_STRANGER, "A-ABORT")] == 0, "a refused address was admitted"
    assert answers[(ALLOWED_STRANGER, "A-ABORT")] > 0, "P-DATA before an association: A-ABORT"
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    about = Counter(
        (line["peer_address"], line["message"].split(":")[0].split(" ", 3)[-1])
        for line in lines
        if line.get("peer_address") in (ALLOWED_STRANGER, REFUSED_STRANGER)
    )
    print(f"run {run}: the node's lines about them: {dict(about)}")
    assert about[(REFUSED_STRANGER, "rejected")] > 0
    assert set(about) & {(REFUSED_STRANGER, "closed"), (REFUSED_STRANGER, "aborted")} == set()
    assert about[(ALLOWED_STRANGER, "rejected")] > 0, "the per-address limit was never met"
    assert about[(ALLOWED_STRANGER, "closed")] > 0, "no timer closed a trickled or idle caller"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def established(port: int) -> tuple[AE, object]:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="DENOISE")
    assert assoc.is_established
    return ae, assoc


@SQLITE
def test_a_300_mib_pdu_is_aborted_before_its_body_is_read(node_factory, db_url: str) -> None:
    node = node_factory("receive").start()
    assert node.process is not None
    before = rss_mib(node.process.pid)
    peak = before
    _, assoc = established(node.port)
    raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
    raw.sendall(struct.pack(">BBL", 0x04, 0, 300 * 2**20))
    chunk = b"\0" * 2**16
    try:
        for _ in range(64):  # 4 MiB of the body, slowly
            raw.sendall(chunk)
            peak = max(peak, rss_mib(node.process.pid))
            time.sleep(0.005)
    except OSError:
        pass  # the node closed the connection: the rest of the body never travels
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    peak = max(peak, rss_mib(node.process.pid))
    print(f"300 MiB PDU: node RSS {before:.0f} MiB before, {peak:.0f} MiB at most")
    assert assoc.is_aborted, "the node did not answer the oversized PDU with an A-ABORT"  # type: ignore[attr-defined]
    assert peak - before < 64

    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 300 * 2**20) + b"\0" * 4096)
        assert sock.recv(10)[:1] == b"\x07", "an oversized A-ASSOCIATE-RQ is aborted too"
    assert "exceeds the 1048576-byte maximum" in node.log_text()


def store_pdus(path: Path, context_id: int, max_pdu: int, uid: str | None = None) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE of ``path``, encoded as a requestor sends them."""
    ds = pydicom.dcmread(path)
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID if uid is None else uid
    primitive.Priority = 0
    primitive.DataSet = BytesIO(encode(ds, False, True))  # explicit VR little endian
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return [P_DATA_TF(data).encode() for data in message.encode_msg(context_id, max_pdu)]


def large_store(port: int, tmp_path: Path) -> tuple[object, list[bytes]]:
    """An established association and the 64 KiB P-DATA PDUs of a 2 MiB C-STORE for it."""
    (large,) = write_phantom_series(tmp_path / "large", PhantomSpec(slices=1, size=1024))
    _, assoc = established(port)
    (context,) = assoc.accepted_contexts  # type: ignore[attr-defined]
    return assoc, store_pdus(large, context.context_id, 65536)


def aborted(assoc: object, seconds: float = 10.0) -> bool:
    """Whether the node aborts ``assoc`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not assoc.is_aborted and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    return bool(assoc.is_aborted)  # type: ignore[attr-defined]


def spool_files(node: object) -> list[Path]:
    spool = node.state_dir / "spool"  # type: ignore[attr-defined]
    return [p for p in spool.rglob("*") if p.is_file()]


@SQLITE
def test_c_stores_cut_off_mid_stream_leave_no_file(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory("receive").start()
    (path,) = write_phantom_series(tmp_path / "one", PhantomSpec(slices=1, size=256))
    cases = Counter[str]()
    for number in range(100):
        _, assoc = established(node.port)
        (context,) = assoc.accepted_contexts  # type: ignore[attr-defined]
        case = ("cut", "cut", "cut", "empty-uid", "unknown-context")[number % 5]
        context_id = 255 if case == "unknown-context" else context.context_id
        pdus = store_pdus(path, context_id, 16384, "" if case == "empty-uid" else None)
        raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
        try:
            for pdu in pdus[: len(pdus) // 2] if case == "cut" else pdus:
                raw.sendall(pdu)
            time.sleep(0.01)
            raw.shutdown(socket.SHUT_RDWR)  # cut: no release, no abort
        except OSError:
            cases[f"{case}: aborted by the node"] += 1
        assoc.abort()  # type: ignore[attr-defined]
        cases[case] += 1

    deadline = time.monotonic() + 30
    while spool_files(node) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = spool_files(node)
    print(f"cut-off C-STOREs {dict(cases)}: {len(left)} files left in the spool")
    assert left == []
    assert storescu(node.port, [path]) == [0x0000], "the node still receives"


@SQLITE
def test_a_data_set_beyond_max_instance_mb_is_aborted_and_others_stored(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    """pynetdicom gathers a data set in memory: the listener stops one that outgrows
    ``max_instance_mb`` while it arrives, and the node goes on receiving."""
    node = node_factory("receive", max_instance_mb=1).start()
    (small,) = write_phantom_series(tmp_path / "small", PhantomSpec(slices=1, size=256))
    assoc, pdus = large_store(node.port, tmp_path)
    raw = assoc.dul.socket.socket  # type: ignore[attr-defined]
    sent = 0
    try:
        for pdu in pdus:
            raw.sendall(pdu)
            sent += 1
            time.sleep(0.001)
    except OSError:
        pass  # the node closed the connection: the rest never travels
    print(f"2 MiB data set, 1 MiB limit: {sent} of {len(pdus)} PDUs of 64 KiB sent")
    assert aborted(assoc), "the node did not abort the oversized data set"
    assert "a data set exceeds max_instance_mb (1 MiB)" in node.log_text()
    assert spool_files(node) == []
    assert storescu(node.port, [small]) == [0x0000]
    assert node.queries.instance_totals()[0] == 1


@SQLITE
def test_data_sets_past_max_inflight_mb_cost_the_largest_caller_its_association(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    """Slow callers, each within ``max_instance_mb``, may not fill the memory between
    them: when a scanner's slice takes the data sets arriving past ``max_inflight_mb``,
    the caller holding the largest unfinished one is aborted and the slice is stored."""
    node = node_factory("receive", max_inflight_mb=2).start()
    (slice_,) = write_phantom_series(tmp_path / "slice", PhantomSpec(slices=1, size=512))
    hoarder, pdus = large_store(node.port, tmp_path)
    held = 28  # 1.75 MiB of its 2 MiB data set, then it goes quiet
    for pdu in pdus[:held]:
        hoarder.dul.socket.socket.sendall(pdu)  # type: ignore[attr-defined]
    time.sleep(0.5)  # the node has read them
    assert hoarder.is_established, "1.75 MiB of 2 must not abort it yet"  # type: ignore[attr-defined]
    assert storescu(node.port, [slice_]) == [0x0000], "the scanner's slice is stored"
    print(f"{held} of {len(pdus)} PDUs of 64 KiB held; a 0.5 MiB slice arrived beside them")
    assert aborted(hoarder), "the largest unfinished data set kept its association"
    log = node.log_text()
    assert "was the largest when the data sets arriving passed max_inflight_mb (2 MiB)" in log
    assert node.queries.instance_totals()[0] == 1
    assert storescu(node.port, [slice_]) == [0x0000], "the budget was given back"


@SQLITE
def test_an_established_association_that_goes_quiet_is_closed(node_factory, db_url: str) -> None:
    """Silent after its A-ASSOCIATE-AC, or stuck half-way through a PDU: closed either way."""
    node = node_factory("receive", idle_timeout_seconds=0.5).start()
    _, quiet = established(node.port)
    _, stuck = established(node.port)
    stuck.dul.socket.socket.sendall(P_DATA[:8])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (quiet.is_established or stuck.is_established):  # type: ignore[attr-defined]
        time.sleep(0.05)
    assert quiet.is_aborted and stuck.is_aborted  # type: ignore[attr-defined]
    assert "no complete PDU within its 0.5 s" in node.log_text()
