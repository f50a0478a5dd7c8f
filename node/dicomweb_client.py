"""A DICOMweb client for one destination: STOW-RS to send (PS3.18 10.5), QIDO-RS to probe.

Derived instances are posted as ``multipart/related; type="application/dicom"``, a
batch per request, streamed from the spool.  The answer (DICOM JSON) lists each
instance in ReferencedSOPSequence (stored, perhaps with a WarningReason) or
FailedSOPSequence (with a FailureReason, a C-STORE-like status), which the sender
records like C-STORE answers.  HTTP statuses that concern the whole request become a
``DeliveryError`` of the matching kind (``node.send_errors``).

Credentials are read from the environment variables the destination names, when a
request is made; neither they nor the server's answer bodies go into messages.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import os
import ssl
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from time import monotonic
from typing import Any
from urllib.parse import urlsplit

from node.destinations import DicomWebDestination
from node.send_errors import DeliveryError, Failure

ACCEPT = "application/dicom+json"
CHUNK = 1 << 20
MAX_ANSWER_BYTES = 16 << 20  # a STOW-RS answer lists UIDs: far less than this
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
CREDENTIAL_KEYS = {"token_env", "username_env", "password_env"}
#: HTTP statuses whose answer lists instances (PS3.18 table 10.5.3-1).
PER_INSTANCE = (200, 202, 409)
UNREADABLE = -1  # a WarningReason or FailureReason that is not a 16-bit number


@dataclass(frozen=True)
class Part:
    """One derived instance to post: its SOP Instance UID, spool file and size."""

    uid: str
    path: Path
    size: int


@dataclass
class StowResult:
    """What the server said about each instance of one request.

    ``stored``: UID → 0, or the WarningReason; ``failed``: UID → FailureReason, or None
    where the answer did not mention the instance (not acknowledged).
    """

    status: int
    stored: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int | None] = field(default_factory=dict)


def batches(parts: Iterable[Part], max_count: int, max_bytes: int) -> Iterator[list[Part]]:
    """Consecutive batches of at most ``max_count`` parts and ``max_bytes`` (a larger
    part goes alone)."""
    batch: list[Part] = []
    size = 0
    for part in parts:
        if batch and (len(batch) >= max_count or size + part.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(part)
        size += part.size
    if batch:
        yield batch


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After (seconds or an HTTP date) as seconds from now; None if absent
    or unreadable.  However large, the sender caps it (``Sender._retry_delay``)."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit() alone takes "²", float() does not
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def parse_answer(status: int, body: bytes, uids: list[str]) -> StowResult:
    """The per-instance outcome of a STOW-RS request whose HTTP status is ``status``.

    Only the UIDs that were sent count.  An instance the answer does not mention is
    stored where the status is 200 (all stored, PS3.18), else not acknowledged.  The
    answer is the server's word, read defensively: a UID that is not a string is no
    mention, a reason that is not a 16-bit number leaves its instance not acknowledged.
    """
    dataset = _dicom_json(body)
    sent = set(uids)
    result = StowResult(status)
    for item in _items(dataset, REFERENCED_SOP_SEQUENCE):
        uid = _uid(item)
        if uid in sent:
            warning = _code(item, WARNING_REASON)
            if warning == UNREADABLE:
                result.failed[uid] = None
            else:
                result.stored[uid] = warning or 0
    for item in _items(dataset, FAILED_SOP_SEQUENCE):
        uid = _uid(item)
        if uid in sent:
            reason = _code(item, FAILURE_REASON)
            result.failed[uid] = None if reason == UNREADABLE else reason
            result.stored.pop(uid, None)
    for uid in uids:
        if uid not in result.stored and uid not in result.failed:
            if status == 200:
                result.stored[uid] = 0
            else:
                result.failed[uid] = None
    return result


def _dicom_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        return {}
    if isinstance(value, list):
        value = value[0] if value else {}
    return value if isinstance(value, dict) else {}


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [item for item in values if isinstance(item, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _uid(item: dict[str, Any]) -> str:
    """The item's SOP Instance UID; "" (no UID sent) where it is not a string."""
    value = _first(item, REFERENCED_SOP_INSTANCE_UID)
    return value if isinstance(value, str) else ""


def _code(item: dict[str, Any], tag: str) -> int | None:
    """A reason (US) the item holds: None where absent, UNREADABLE where not 0..0xFFFF."""
    value = _first(item, tag)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        return value
    return UNREADABLE


class DicomWebClient:
    """Requests to one DICOMweb destination, named ``name`` in the configuration."""

    def __init__(
        self,
        name: str,
        destination: DicomWebDestination,
        timeout: float,
        ca_file: Path | None = None,
    ) -> None:
        self.name = name
        self.destination = destination
        self.timeout = timeout
        self._ca_file = destination.tls_ca_file or ca_file
        self._url = urlsplit(destination.url)

    # -- STOW-RS -------------------------------------------------------------------------

    def store(self, parts: list[Part]) -> StowResult:
        """Post ``parts`` in one request; raises DeliveryError when the whole request failed."""
        boundary = f"denoise-node-{uuid.uuid4().hex}"
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(head) + part.size + 2 for part in parts) + len(tail)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
        }
        what = f"the STOW-RS of {len(parts)} instance(s)"
        status, reason, retry_after, body = self._request(
            "POST", "/studies", headers, _multipart(head, parts, tail), what
        )
        if status in PER_INSTANCE:
            return parse_answer(status, body, [part.uid for part in parts])
        raise self._status_error(status, reason, retry_after, what)

    # -- QIDO-RS -------------------------------------------------------------------------

    def probe(self) -> tuple[bool, str]:
        """Whether the service answers a QIDO-RS query with these credentials, in words."""
        started = monotonic()
        try:
            status, reason, retry_after, _ = self._request(
                "GET", "/studies?limit=1", {}, None, "a QIDO-RS query"
            )
            if status not in (200, 204):
                raise self._status_error(status, reason, retry_after, "a QIDO-RS query")
        except DeliveryError as exc:
            return False, str(exc).removeprefix(f"{self.name}: ")
        return True, f"QIDO-RS ok in {(monotonic() - started) * 1000:.0f} ms"

    # -- HTTP ----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: Iterable[bytes] | None,
        what: str,
    ) -> tuple[int, str, float | None, bytes]:
        """One request on a fresh connection: status, reason, Retry-After and the body."""
        headers = {"Accept": ACCEPT, **headers, **self._authorization()}
        connection = self._connection()
        try:
            connection.request(method, self._url.path + path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read(MAX_ANSWER_BYTES)
            retry_after = retry_after_seconds(response.getheader("Retry-After"))
            return response.status, response.reason, retry_after, answer
        except (OSError, http.client.HTTPException) as exc:
            raise DeliveryError(
                self.name,
                f"{self.destination.url} could not be reached or did not answer {what} "
                f"({type(exc).__name__}: {exc})",
                Failure.TRANSIENT,
            ) from exc
        finally:
            connection.close()

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._url.hostname or "", self._url.port
        if self._url.scheme == "http":
            return http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            context = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(self.name, f"TLS setup failed: {exc}", Failure.BROKEN) from exc
        return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=context)

    def _authorization(self) -> dict[str, str]:
        destination = self.destination
        if destination.token_env is not None:
            return {"Authorization": f"Bearer {self._secret('token_env', destination.token_env)}"}
        if destination.username_env is not None and destination.password_env is not None:
            user = self._secret("username_env", destination.username_env)
            password = self._secret("password_env", destination.password_env)
            pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            return {"Authorization": f"Basic {pair}"}
        return {}

    def _secret(self, key: str, variable: str) -> str:
        value = os.environ.get(variable)
        if not value:
            raise DeliveryError(
                self.name,
                f"environment variable {variable} (named by {key}) is not set",
                Failure.BROKEN,
            )
        return value

    def _status_error(
        self, status: int, reason: str, retry_after: float | None, what: str
    ) -> DeliveryError:
        answer = f"{self.destination.url} answered HTTP {status} {reason} to {what}"
        if status in (401, 403):
            named = [
                f"{key} ({variable})"
                for key, variable in self.destination.model_dump(include=CREDENTIAL_KEYS).items()
                if variable
            ]
            hint = (
                f"check the credentials in the environment variables {' and '.join(named)}"
                if named
                else "it asks for credentials: set token_env or username_env/password_env"
            )
            return DeliveryError(self.name, f"{answer}: configuration: {hint}", Failure.BROKEN)
        if status in (429, 503):
            return DeliveryError(self.name, answer, Failure.TRANSIENT, retry_after)
        if status >= 500:
            return DeliveryError(self.name, answer, Failure.TRANSIENT)
        if status == 413:
            answer += ": lower batch_bytes or batch_instances"
        return DeliveryError(self.name, answer, Failure.REFUSED)


def _multipart(head: bytes, parts: list[Part], tail: bytes) -> Iterator[bytes]:
    """The request body, file by file in ``CHUNK`` pieces: a batch is never held whole."""
    for part in parts:
        yield head
        with part.path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield tail
