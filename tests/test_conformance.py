"""docs/conformance.md lists exactly what the receiver accepts and the sender proposes.

Both sides are asked over real associations on 127.0.0.1: the receiver with every
storage class and transfer syntax pynetdicom knows, the sender against a peer that
records the presentation contexts it is offered.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StorageCommitmentPushModel,
    Verification,
)

from devtools.tools import free_port
from node.c_store_client import associate
from node.config import Settings
from node.context import NodeContext
from node.destinations import Destination
from node.receiver import Receiver
from node.sender import Sender

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def listed(marker: str) -> set[str]:
    """The UIDs in the table that follows ``<!-- marker -->`` in the statement."""
    text = DOCUMENT.read_text()
    table = text.split(f"<!-- {marker} -->", 1)[1].strip().split("\n\n", 1)[0]
    return set(re.findall(r"\|\s*(1\.2\.840\.10008\.[0-9.]+)\s*\|", table))


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    settings = Settings(
        state_dir=tmp_path / "state",
        bind_address="127.0.0.1",
        port=free_port(),
        spool_min_free_mb=0,
    )
    context = NodeContext.open(settings)
    yield context
    context.close()


def accepted(ctx: NodeContext, contexts: list[tuple[str, list[str]]]) -> set[tuple[str, str]]:
    """(abstract syntax, transfer syntax) pairs the receiver accepts of ``contexts``."""
    ae = AE(ae_title="PROBE")
    for abstract, syntaxes in contexts:
        for syntax in syntaxes:  # one context per syntax: each is answered on its own
            ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", ctx.settings.port, ae_title=ctx.settings.ae_title)
    assert assoc.is_established
    pairs = {(c.abstract_syntax, c.transfer_syntax[0]) for c in assoc.accepted_contexts}
    assoc.release()
    return {(str(a), str(t)) for a, t in pairs}


def test_the_receiver_accepts_exactly_the_listed_classes_and_syntaxes(ctx: NodeContext) -> None:
    receiver = Receiver(ctx)
    receiver.start()
    try:
        candidates = [
            Verification,
            CTImageStorage,
            EnhancedCTImageStorage,
            MRImageStorage,
            SecondaryCaptureImageStorage,
            StorageCommitmentPushModel,
        ]
        classes = accepted(ctx, [(uid, [EXPLICIT_LE]) for uid in candidates])
        syntaxes = accepted(ctx, [(CTImageStorage, list(ALL_TRANSFER_SYNTAXES))])
        reports = accepted(ctx, [(StorageCommitmentPushModel, list(ALL_TRANSFER_SYNTAXES))])
    finally:
        receiver.stop()
    assert {syntax for _, syntax in reports} == {EXPLICIT_LE, "1.2.840.10008.1.2"}
    assert {abstract for abstract, _ in classes} == listed("accepted-sop-classes")
    assert {syntax for _, syntax in syntaxes} == listed("accepted-transfer-syntaxes")


def test_the_sender_proposes_exactly_the_listed_classes_and_syntaxes(ctx: NodeContext) -> None:
    offered: list[tuple[str, list[str]]] = []

    def record(event: evt.Event) -> None:
        for context in event.assoc.requestor.requested_contexts:
            offered.append(
                (str(context.abstract_syntax), [str(t) for t in context.transfer_syntax])
            )

    peer = AE(ae_title="PACS")
    for abstract in (
        CTImageStorage,
        EnhancedCTImageStorage,
        Verification,
        StorageCommitmentPushModel,
    ):
        peer.add_supported_context(abstract, list(ALL_TRANSFER_SYNTAXES))
    port = free_port()
    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, record)]
    )
    try:
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
        sender = Sender(ctx, threading.Event())
        for assoc in (
            associate(ctx.settings, "pacs", destination),
            sender._connect_for_commitment("pacs", destination, []),
        ):
            assert assoc is not None
            assoc.release()
    finally:
        server.shutdown()
    assert {abstract for abstract, _ in offered} == listed("proposed-sop-classes")
    assert {syntax for _, syntaxes in offered for syntax in syntaxes} == listed(
        "proposed-transfer-syntaxes"
    )
