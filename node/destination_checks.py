"""Is each destination reachable as the sender would reach it: C-ECHO or a QIDO-RS query.

Used by ``denoise-node status``, the dashboard and the REST API (through ``node.overview``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from node.association_request import request_association
from node.context import NodeContext
from node.destinations import Destination, DicomWebDestination
from node.dicom_tls import TLSSetupError, client_tls_args
from node.dicomweb_client import DicomWebClient

ECHO_TIMEOUT_SECONDS = 3.0


class DestinationCheck(BaseModel):
    name: str
    ae_title: str  # "DICOMweb" for a DICOMweb destination, whose address is ``url``
    host: str
    port: int
    reachable: bool
    detail: str
    kind: Literal["dicom", "dicomweb"] = "dicom"
    url: str | None = None
    #: the destination is asked for storage commitment: ``acknowledged`` jobs await it
    storage_commitment: bool = False


def echo_destination(ctx: NodeContext, name: str, destination: Destination) -> DestinationCheck:
    """C-ECHO one destination with the node's own AE title, as the sender would associate."""
    ae = AE(ae_title=ctx.settings.ae_title)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ECHO_TIMEOUT_SECONDS
    ae.network_timeout = ECHO_TIMEOUT_SECONDS
    started = monotonic()
    try:
        # The sender's TLS setup, so the check proves what sending needs.
        tls_args = client_tls_args(ctx.settings, destination)
        assoc, rejection = request_association(
            ae, destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
        )
    except (TLSSetupError, OSError) as exc:
        return _check(name, destination, False, str(exc))
    if not assoc.is_established:
        why = f"rejected the association ({rejection.words})" if rejection else "not reachable"
        return _check(name, destination, False, why)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status else None
    if code != 0:
        return _check(
            name,
            destination,
            False,
            f"C-ECHO {'no answer' if code is None else f'status 0x{code:04X}'}",
        )
    return _check(name, destination, True, f"C-ECHO ok in {(monotonic() - started) * 1000:.0f} ms")


def _check(name: str, destination: Destination, reachable: bool, detail: str) -> DestinationCheck:
    return DestinationCheck(
        name=name,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        reachable=reachable,
        detail=detail,
        storage_commitment=destination.storage_commitment,
    )


def probe_dicomweb(
    ctx: NodeContext, name: str, destination: DicomWebDestination
) -> DestinationCheck:
    """A QIDO-RS query with the sender's credentials and TLS setup."""
    client = DicomWebClient(name, destination, ECHO_TIMEOUT_SECONDS, ctx.settings.tls_ca_file)
    reachable, detail = client.probe()
    url = urlsplit(destination.url)
    return DestinationCheck(
        name=name,
        ae_title="DICOMweb",
        host=url.hostname or "",
        port=url.port or (443 if url.scheme == "https" else 80),
        reachable=reachable,
        detail=detail,
        kind="dicomweb",
        url=destination.url,
    )


def _check_one(
    ctx: NodeContext, name: str, destination: Destination | DicomWebDestination
) -> DestinationCheck:
    if isinstance(destination, DicomWebDestination):
        return probe_dicomweb(ctx, name, destination)
    return echo_destination(ctx, name, destination)


def check_destinations(ctx: NodeContext) -> list[DestinationCheck]:
    """Check every configured destination in parallel: at most one timeout in total."""
    items = sorted(ctx.settings.destinations.items())
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(lambda item: _check_one(ctx, *item), items))
