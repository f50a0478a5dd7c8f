"""STOW-RS (DICOMweb store): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``.

The web role's door for instances, beside the C-STORE receiver and into the same spool
and job table under the same rule: an instance is listed in ReferencedSOPSequence only
once ``node.storing`` has checked it, fsynced it and recorded it; every other part is in
FailedSOPSequence with its FailureReason.  200: all stored, 202: some failed, 409: none
stored (503 with Retry-After when every failure is out of resources, A7xx).  The body
(``multipart/related; type="application/dicom"``) is streamed to files part by part
(``node.web.multipart``, into ``<spool>/stow``), at most ``stow_max_request_mb``; a
malformed body stores nothing (400).  The spool's watermark is checked before the body
(for its declared length) and again as it streams (each part, each 64 MiB), and at most
``stow_max_concurrent_requests`` run at once: else 503 with Retry-After, before the disk
fills.  What a crash leaves there goes at the web role's next start (one web role per
spool) or with housekeeping's orphans.

Who may store: the ``admin`` and ``store`` roles, by HTTP Basic or a bearer token
(``node.web.auth``), from an address in ``allowed_addresses``.  A request with a foreign
Origin is refused; there are no browser forms here, so no CSRF token.

No ``from __future__ import annotations``: the routes are made per node (their
dependency reads its allow-list) and FastAPI must see their real annotations.
"""

import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from node import storing
from node.context import NodeContext
from node.instance_checks import CANNOT_UNDERSTAND, Refused, valid_uid
from node.listener import ListenerLimits
from node.spool import STOW_FOLDER, SpoolFull
from node.storing import HANDLER_FAILED, SPOOL_FULL, Accepted, Arrival
from node.web.auth import Principal, client_address, same_origin
from node.web.multipart import (
    BodyTooLarge,
    MalformedBody,
    Part,
    PartsToFiles,
)
from node.web.part_folders import PartFolder
from node.web.state import WebState, web_state

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
MAX_BOUNDARY = 200
#: Statuses A700..A7FF (the high byte): out of resources, a state that passes.
OUT_OF_RESOURCES = 0xA700
#: What an instance that came by STOW-RS records as its calling AE title: the account's
#: name, cut to an AE title's 16 characters (rules may select on it).
AE_TITLE_LENGTH = 16


def router(ctx: NodeContext) -> APIRouter:
    """The STOW-RS routes of one node (its allow-list read once, as the listener does).

    Made once at the web role's start: it claims this role's folder of part files, and
    the part files that stopped roles left go now (``node.web.part_folders``).
    """
    limits = ListenerLimits.from_settings(ctx.settings)
    admission = _Admission(ctx)
    part_folder = PartFolder(ctx.spool.root / STOW_FOLDER)
    if part_folder.removed:
        log.info("removed %s STOW-RS part files that stopped web roles left", part_folder.removed)
    routes = APIRouter(include_in_schema=False)

    def storer(request: Request, web: Annotated[WebState, Depends(web_state)]) -> Principal:
        """An admin or store account, from an allowed address and no foreign origin."""
        if not limits.address_allowed(client_address(request)):
            log.warning(
                "STOW-RS from %s refused: address not in allowed_addresses",
                client_address(request),
                extra={"audit": True, "address": client_address(request)},
            )
            raise HTTPException(403, "address not allowed")
        if not same_origin(request):
            raise HTTPException(403, "cross-origin request refused")
        principal = web.principal(request)
        if principal is None:
            raise HTTPException(
                401, "login required", headers={"WWW-Authenticate": 'Basic realm="denoise-node"'}
            )
        if not principal.may_store:
            raise HTTPException(403, f"{principal.name} may not store (role {principal.role})")
        return principal

    @routes.post("/dicomweb/studies")
    async def store(request: Request, principal: Annotated[Principal, Depends(storer)]) -> Response:
        """Store the posted instances, of any study."""
        return await _stow(ctx, admission, part_folder.path, request, principal, None)

    @routes.post("/dicomweb/studies/{study}")
    async def store_study(
        request: Request, study: str, principal: Annotated[Principal, Depends(storer)]
    ) -> Response:
        """Store the posted instances of ``study``; an instance of another fails (0xA900)."""
        if not valid_uid(study):
            raise HTTPException(400, "the study in the path is not a UID")
        return await _stow(ctx, admission, part_folder.path, request, principal, study)

    return routes


def _boundary(request: Request) -> bytes:
    """The body's boundary: 415 unless multipart/related of application/dicom parts."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    part_type = options.get(b"type", b"application/dicom").strip().lower()
    if kind.lower() != b"multipart/related" or part_type != b"application/dicom":
        raise HTTPException(415, 'only multipart/related; type="application/dicom" is accepted')
    boundary = options.get(b"boundary", b"")
    # RFC 2046 allows 70 characters; Orthanc sends two UUIDs (73): be lenient, but bounded.
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise HTTPException(400, "the multipart body has no valid boundary")
    return boundary


@dataclass(frozen=True)
class _Source:
    """Who posted the parts, from where, for which study (None: any)."""

    principal: Principal
    address: str
    study: str | None

    def arrival(self, part: Part) -> Arrival:
        """A part as the shared checks take it; the account's name is its calling AE."""
        calling_ae = self.principal.name[:AE_TITLE_LENGTH]
        return Arrival(part.path, calling_ae, self.address, part.content, study=self.study)


class _Admission:
    """How many STOW-RS requests run at once, and whether the spool has room for one."""

    def __init__(self, ctx: NodeContext) -> None:
        self.spool = ctx.spool
        self.slots = threading.BoundedSemaphore(ctx.settings.stow_max_concurrent_requests)
        self.retry_after = str(math.ceil(ctx.settings.stow_retry_after_seconds))

    def unavailable(self, reason: str) -> HTTPException:
        """503 with Retry-After: the client sends the request again later."""
        return HTTPException(503, reason, headers={"Retry-After": self.retry_after})

    def room(self, declared: int | None) -> Callable[[int], None]:
        """The check ``PartsToFiles`` makes as the body streams: the rest of the declared
        body (none when undeclared) must fit above the watermark; raises SpoolFull."""

        def check(received: int) -> None:
            self.spool.check_room(max((declared or 0) - received, 0))

        return check


def _declared_length(request: Request, max_bytes: int) -> int | None:
    """The body's Content-Length, if it has one; 413 past ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return None
    if int(declared) > max_bytes:
        raise HTTPException(413, f"the request is longer than {max_bytes} bytes")
    return int(declared)


async def _stow(
    ctx: NodeContext,
    admission: _Admission,
    folder: Path,
    request: Request,
    principal: Principal,
    study: str | None,
) -> Response:
    """Admit the request (a slot, room for its body), then receive it into ``folder``
    and store it."""
    boundary = _boundary(request)
    max_bytes = ctx.settings.stow_max_request_mb * 2**20
    room = admission.room(_declared_length(request, max_bytes))
    actor = principal.actor
    if not admission.slots.acquire(blocking=False):
        log.warning("STOW-RS from %s refused: as many requests as allowed are running", actor)
        raise admission.unavailable("too many STOW-RS requests at once, try again later")
    try:
        room(0)
        parts = PartsToFiles(folder, boundary, max_bytes, room)
        source = _Source(principal, client_address(request), study)
        return await _receive(ctx, request, parts, source, admission.retry_after)
    except SpoolFull as exc:
        log.warning("STOW-RS from %s refused: %s", actor, exc)
        raise admission.unavailable("node spool is full, try again later") from exc
    finally:
        admission.slots.release()


async def _receive(
    ctx: NodeContext, request: Request, parts: PartsToFiles, source: _Source, retry_after: str
) -> Response:
    """Stream the body into part files, then store each; the files left go at the end."""
    actor = source.principal.actor
    try:
        async for chunk in request.stream():
            await run_in_threadpool(parts.write, chunk)
        received = await run_in_threadpool(parts.finish)
        answer = await run_in_threadpool(_store_parts, ctx, received, source, retry_after)
    except MalformedBody as exc:
        log.warning("STOW-RS from %s refused: %s", actor, exc)
        raise HTTPException(400, str(exc)) from exc
    except BodyTooLarge as exc:
        raise HTTPException(413, str(exc)) from exc
    except ClientDisconnect:
        log.warning("STOW-RS from %s: the client left before the body ended", actor)
        return Response(status_code=400)  # nobody reads it; nothing was stored
    finally:
        await run_in_threadpool(parts.close)
    return answer


def _store_parts(
    ctx: NodeContext, parts: list[Part], source: _Source, retry_after: str
) -> Response:
    """Accept each part in turn; the DICOM JSON answer and its HTTP status.

    None stored: 503 with Retry-After when every failure is out of resources (A7xx: the
    spool or the job table, which pass), else 409 (the content is refused).
    """
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    tally: Counter[str] = Counter()
    transient = True
    for part in parts:
        try:
            accepted = _store_part(ctx, part, source.arrival(part))
        except Refused as refused:
            failed.append(_sop_item(refused.uids, refused.status))
            tally[f"refused 0x{refused.status:04X}"] += 1
            transient = transient and refused.status & 0xFF00 == OUT_OF_RESOURCES
        else:
            referenced.append(_sop_item((accepted.sop_class_uid, accepted.sop_instance_uid)))
            tally[accepted.outcome] += 1
    actor = source.principal.actor
    log.info(
        "STOW-RS from %s at %s: %s",
        actor,
        source.address,
        ", ".join(f"{count} {outcome}" for outcome, count in sorted(tally.items())),
        extra={"actor": actor, "peer_address": source.address},
    )
    body: dict[str, Any] = {}
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
    if referenced:
        body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": referenced}
    content = json.dumps(body, separators=(",", ":")).encode()
    if failed and not referenced and transient:
        headers = {"Retry-After": retry_after}
        return Response(content, status_code=503, headers=headers, media_type=DICOM_JSON)
    status = 200 if not failed else 202 if referenced else 409
    return Response(content, status_code=status, media_type=DICOM_JSON)


def _store_part(ctx: NodeContext, part: Part, arrival: Arrival) -> Accepted:
    """One part through the receiver's checks, spool and job table; raises Refused."""
    extra: dict[str, Any] = {"service": "STOW-RS", "calling_ae": arrival.calling_ae_title}
    if part.write_failed:
        log.warning("STOW-RS refused: a part could not be written in full", extra=extra)
        raise Refused(SPOOL_FULL, "node spool is full")
    if part.content_type not in ("", "application/dicom"):
        log.warning("STOW-RS refused: a part is not application/dicom", extra=extra)
        raise Refused(CANNOT_UNDERSTAND, "part is not application/dicom")
    try:
        return storing.accept(ctx, arrival, extra)
    except Refused:
        raise
    except Exception as exc:
        log.error(
            "STOW-RS failed unexpectedly: %s at %s",
            exc.__class__.__name__,
            storing.where(exc),
            extra=extra,
        )
        raise Refused(HANDLER_FAILED, "internal error in the receiver, see its log") from exc


def _sop_item(uids: tuple[str, str] | None, reason: int | None = None) -> dict[str, Any]:
    """A ReferencedSOPSequence or FailedSOPSequence item (UIDs only where they are valid)."""
    item: dict[str, Any] = {}
    if uids is not None:
        item["00081150"] = {"vr": "UI", "Value": [uids[0]]}
        item["00081155"] = {"vr": "UI", "Value": [uids[1]]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item
