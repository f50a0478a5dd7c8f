"""A multipart/related request body streamed into files, one per part, never whole in memory.

STOW-RS posts instances as the parts of one ``multipart/related`` body.  The body is
fed chunk by chunk to python-multipart's parser, whose callbacks write each part's bytes
to its own file in a folder on the spool's disk (so that an accepted part is renamed into
the spool, not copied).  The body is bounded: past ``max_bytes`` or ``MAX_PARTS`` it is
refused.  A body
that breaks the multipart syntax, or ends before its closing boundary, is malformed.

A part's file ends in ``PART_SUFFIX``, not the spool's ``.partial``: the receiver's
start removes old ``.partial`` files, and a finished part of a long upload is old
while it waits for the rest of its body.  Each web role writes into a folder of its own
(``node.web.part_folders``), whose leftovers the next web role's start removes.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

if TYPE_CHECKING:
    from hashlib import _Hash

#: Parts per request: each is a file, so a body of tiny parts cannot make millions.
MAX_PARTS = 10_000
PART_SUFFIX = ".stow-part"
#: A part's header fields and values together: a DICOM part needs a Content-Type, and
#: older python-multipart releases bound no header line, newer ones each to 4 KiB.
MAX_PART_HEADER_BYTES = 8192
#: Within a long part, the room on the disk is checked again after this many bytes.
ROOM_CHECK_BYTES = 64 * 2**20


class MalformedBody(ValueError):
    """The body is not a complete multipart body: nothing in it is stored."""


class BodyTooLarge(Exception):
    """The body is longer than the node accepts in one request."""


@dataclass
class Part:
    """One part's file, its Content-Type (empty when the part has none) and whether
    writing it failed (the disk is full): such a part is refused, not stored in part.
    Its bytes are hashed as they are written, as the C-STORE receiver does."""

    path: Path
    content_type: str = ""
    write_failed: bool = False
    size: int = 0
    digest: _Hash = field(default_factory=hashlib.sha256)

    @property
    def content(self) -> tuple[str, int]:
        """(SHA-256, size) of what was written, as the job table records them."""
        return self.digest.hexdigest(), self.size


class PartsToFiles:
    """Feed ``write`` the body's chunks, then ``finish``; ``close`` removes what is left.

    ``room`` is called with the bytes received so far at each part's start and every
    ``ROOM_CHECK_BYTES``; it raises (the spool's SpoolFull) to stop the body there.
    """

    def __init__(
        self,
        folder: Path,
        boundary: bytes,
        max_bytes: int,
        room: Callable[[int], None] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.max_bytes = max_bytes
        self.parts: list[Part] = []
        self._room = room
        self._received = 0
        self._room_checked_at = 0
        self._ended = False
        self._handle: BinaryIO | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._header_bytes = 0
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda data, start, end: self._header(
                    self._field, data[start:end]
                ),
                "on_header_value": lambda data, start, end: self._header(
                    self._value, data[start:end]
                ),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        """Parse the next chunk; raises BodyTooLarge or MalformedBody."""
        self._received += len(chunk)
        if self._received > self.max_bytes:
            raise BodyTooLarge(f"the request body is longer than {self.max_bytes} bytes")
        if self._received - self._room_checked_at >= ROOM_CHECK_BYTES:
            self._check_room()
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            # Not the parser's text: it may quote bytes of the body.
            raise MalformedBody("not a multipart body (bad boundary or part header)") from exc

    def finish(self) -> list[Part]:
        """The parts, once the whole body was read; MalformedBody if it is incomplete."""
        self._parser.finalize()
        if not self._ended:
            raise MalformedBody("the body ends before its closing boundary")
        if not self.parts:
            raise MalformedBody("the body has no parts")
        return self.parts

    def close(self) -> None:
        """Remove every part's file that is still here (an accepted one was moved)."""
        self._close_handle()
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    def _part_begin(self) -> None:
        self._close_handle()
        self._header_bytes = 0
        if len(self.parts) >= MAX_PARTS:
            raise BodyTooLarge(f"the request has more than {MAX_PARTS} parts")
        self._check_room()
        part = Part(self.folder / f"{uuid.uuid4().hex}{PART_SUFFIX}")
        self.parts.append(part)
        try:
            self._handle = open(part.path, "xb")  # noqa: SIM115 - closed at the part's end
        except OSError:
            part.write_failed = True

    def _check_room(self) -> None:
        self._room_checked_at = self._received
        if self._room is not None:
            self._room(self._received)

    def _header(self, buffer: bytearray, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise MalformedBody(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
        buffer.extend(data)

    def _header_end(self) -> None:
        if bytes(self._field).strip().lower() == b"content-type" and self.parts:
            value = bytes(self._value).decode("latin-1").split(";")[0]
            self.parts[-1].content_type = value.strip().lower()
        self._field.clear()
        self._value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is None:
            return
        part, chunk = self.parts[-1], data[start:end]
        try:
            self._handle.write(chunk)
        except OSError:
            part.write_failed = True
            self._close_handle()
            return
        part.digest.update(chunk)
        part.size += len(chunk)

    def _part_end(self) -> None:
        self._close_handle()

    def _end(self) -> None:
        self._ended = True

    def _close_handle(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.close()
        except OSError:
            if self.parts:
                self.parts[-1].write_failed = True
