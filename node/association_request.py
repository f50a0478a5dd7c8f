"""Open an association as requestor and tell a rejection apart from an unreachable peer.

pynetdicom sets ``Association.is_rejected`` from the thread that waits for the answer; when a
peer answers A-ASSOCIATE-RJ and closes at once, that thread can find the transport already
closed and report an abort instead (about 1 in 20 on loopback against a fast peer). The
A-ASSOCIATE-RJ PDU itself is always decoded by the reactor before it closes the transport, so
a handler on that event sees every rejection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ

#: A-ASSOCIATE-RJ result "rejected-permanent" (PS3.8 9.3.4): retrying will not help.
REJECTED_PERMANENT = 0x01


@dataclass(frozen=True)
class Rejection:
    """The peer's A-ASSOCIATE-RJ: whether it is permanent, and its result, source and reason."""

    permanent: bool
    words: str


def request_association(
    ae: AE, host: str, port: int, **kwargs: Any
) -> tuple[Association, Rejection | None]:
    """``ae.associate(host, port, **kwargs)``, and the peer's rejection if it sent one."""
    answers: list[A_ASSOCIATE_RJ] = []

    def keep_rejection(event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):
            answers.append(event.pdu)

    handlers = [*(kwargs.pop("evt_handlers", None) or []), (evt.EVT_PDU_RECV, keep_rejection)]
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    if assoc.is_established or not answers:
        return assoc, None
    pdu = answers[0]
    answer = pdu.to_primitive()  # the same words pynetdicom's own log uses
    try:
        words = f"{answer.result_str}, {answer.source_str}: {answer.reason_str}"
    except ValueError:
        words = "no reason given"
    return assoc, Rejection(pdu.result == REJECTED_PERMANENT, words)
