"""STOW-RS under pressure, over real HTTP against a running node process: a part file
of a running upload outlives a receiver's start; part headers are bounded; a full spool
or too many requests at once are answered 503 with Retry-After before the body fills
the disk.  Requests held half-sent use http.client, so that the test decides when the
rest of the body comes."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.node_process import NodeProcess
from node.web.multipart import PART_SUFFIX
from tests.test_stow_endpoint import (
    BOUNDARY,
    DICOM_PARTS,
    PASSWORD,
    multipart,
    start_stow_node,
    stow,
    uid_of,
)

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def open_upload(node: NodeProcess, head: bytes, length: int) -> http.client.HTTPConnection:
    """A STOW-RS request of ``length`` bytes whose first ``head`` bytes are sent."""
    port = node.web_port  # type: ignore[attr-defined]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/dicomweb/studies")
    credentials = base64.b64encode(f"scanner:{PASSWORD}".encode()).decode()
    for name, value in (
        ("Authorization", f"Basic {credentials}"),
        ("Content-Type", DICOM_PARTS),
        ("Accept", "application/dicom+json"),
        ("Content-Length", str(length)),
    ):
        connection.putheader(name, value)
    connection.endheaders()
    if head:
        connection.send(head)
    return connection


def finish_upload(connection: http.client.HTTPConnection, rest: bytes) -> http.client.HTTPResponse:
    """Send the rest (the node may have answered and closed already) and read the answer."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        connection.send(rest)
    return connection.getresponse()


def stored_uids(answer: http.client.HTTPResponse) -> list[str]:
    items = json.loads(answer.read()).get("00081199", {}).get("Value", [])
    return [item["00081155"]["Value"][0] for item in items]


def part_files(node: NodeProcess) -> list[Path]:
    return sorted((node.state_dir / "spool" / "stow").glob(f"*{PART_SUFFIX}"))


def wait_part_files(node: NodeProcess, count: int) -> list[Path]:
    node.wait_for(lambda: len(part_files(node)) >= count, 30, f"{count} part files")
    return part_files(node)


@SQLITE_ONLY
def test_a_receiver_start_leaves_the_parts_of_a_running_upload(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path], tmp_path: Path
) -> None:
    """A finished part waits, untouched, for the rest of its body; a receiver starting on
    the same spool meanwhile must not take it for a crash's leftover.  What a stopped web
    role left goes at the next web role's start."""
    stow_folder = tmp_path / "state" / "spool" / "stow"
    stow_folder.mkdir(parents=True)
    left_over = stow_folder / f"left-by-a-crash{PART_SUFFIX}"
    left_over.write_bytes(b"part of an upload nobody finished")
    web = start_stow_node(node_factory, roles="web")
    assert not left_over.exists()

    first, second = (path.read_bytes() for path in phantom_series[:2])
    body = multipart([first, second])
    head = body[: body.index(second)]  # the first part whole, the second begun
    upload = open_upload(web, head, len(body))
    hour_ago = time.time() - 3600
    for path in wait_part_files(web, 2):
        os.utime(path, (hour_ago, hour_ago))
    node_factory(roles="receive").start()  # removes the spool's old *.partial files
    assert len(part_files(web)) == 2

    answer = finish_upload(upload, body[len(head) :])
    assert answer.status == 200
    assert stored_uids(answer) == [uid_of(path) for path in phantom_series[:2]]
    assert not part_files(web)


@SQLITE_ONLY
def test_part_headers_longer_than_8_kib_are_a_malformed_body(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path]
) -> None:
    """Each header line is short enough for python-multipart; together they are not."""
    node = start_stow_node(node_factory)
    padding = b"".join(b"X-Padding-%d: %s\r\n" % (n, b"a" * 3000) for n in range(3))
    boundary = BOUNDARY.encode()
    body = (
        b"--"
        + boundary
        + b"\r\nContent-Type: application/dicom\r\n"
        + padding
        + b"\r\n"
        + phantom_series[0].read_bytes()
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    answer = stow(node, body)
    assert answer.status_code == 400
    assert "headers are longer than 8192 bytes" in answer.text
    assert node.queries.list_jobs() == []
    assert not part_files(node)
