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
import shutil
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
    failures,
    multipart,
    referenced,
    start_stow_node,
    stow,
    uid_of,
)

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
SPOOL_WRITE_FAILED = 0xA701


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
    return sorted((node.state_dir / "spool" / "stow").glob(f"*/*{PART_SUFFIX}"))


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
def test_a_second_web_role_on_the_spool_leaves_the_first_ones_upload(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path], tmp_path: Path
) -> None:
    """Two web roles on one spool (behind one proxy): the second's start leaves the parts
    the first is receiving, whose upload then completes; once the first is killed, the
    next web role's start removes what it left, and only that."""
    first = start_stow_node(node_factory, roles="web")
    one, two = (path.read_bytes() for path in phantom_series[:2])
    body = multipart([one, two])
    head = body[: body.index(two)]
    upload = open_upload(first, head, len(body))
    wait_part_files(first, 2)

    second = start_stow_node(node_factory, roles="web")
    assert len(part_files(first)) == 2
    answer = finish_upload(upload, body[len(head) :])
    assert answer.status == 200
    assert stored_uids(answer) == [uid_of(path) for path in phantom_series[:2]]

    upload = open_upload(second, head, len(body))  # held open by the second role
    (second_folder,) = {path.parent for path in wait_part_files(second, 2)}
    folders = [path for path in (tmp_path / "state" / "spool" / "stow").iterdir() if path.is_dir()]
    (first_folder,) = [folder for folder in folders if folder != second_folder]
    stranded = first_folder / f"stranded{PART_SUFFIX}"
    stranded.write_bytes(b"a part the first role was receiving when it was killed")
    first.kill()

    start_stow_node(node_factory, roles="web")
    assert not first_folder.exists() and not stranded.exists()
    assert len(part_files(second)) == 2
    assert finish_upload(upload, body[len(head) :]).status == 200


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


def watermark_below_free(tmp_path: Path, margin_mb: int) -> int:
    """A spool_min_free_mb that leaves ``margin_mb`` above it on this test's disk now."""
    return shutil.disk_usage(tmp_path).free // 2**20 - margin_mb


@SQLITE_ONLY
def test_a_body_declared_longer_than_the_room_is_refused_before_it_is_sent(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    node = start_stow_node(
        node_factory,
        spool_min_free_mb=watermark_below_free(tmp_path, 256),
        stow_retry_after_seconds=42.5,
    )
    answer = open_upload(node, b"", 2**30).getresponse()  # the headers only, no body
    assert answer.status == 503
    assert answer.getheader("Retry-After") == "43"
    assert "spool is full" in answer.read().decode()
    assert "MiB watermark" in node.log_text()


@SQLITE_ONLY
def test_a_spool_that_fills_while_the_body_streams_stops_it_at_the_next_part(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path], tmp_path: Path
) -> None:
    """The body fits when it starts; then the disk fills (another writer): the next part
    is not written, and nothing of the request is stored."""
    watermark_mb = watermark_below_free(tmp_path, 256)
    node = start_stow_node(node_factory, spool_min_free_mb=watermark_mb)
    first, second = (path.read_bytes() for path in phantom_series[:2])
    body = multipart([first, second])
    head = body[: len(first) // 2]
    upload = open_upload(node, head, len(body))
    wait_part_files(node, 1)
    filler = tmp_path / "another-writer"
    with open(filler, "wb") as handle:  # the disk's free space 64 MiB below the watermark
        size = shutil.disk_usage(tmp_path).free - watermark_mb * 2**20 + 2**26
        os.posix_fallocate(handle.fileno(), 0, size)
    try:
        answer = finish_upload(upload, body[len(head) :])
    finally:
        filler.unlink()
    assert answer.status == 503
    assert answer.getheader("Retry-After") == "60"
    assert answer.getheader("Content-Type") == "application/json"  # not a STOW-RS answer
    assert node.queries.list_jobs() == []
    assert not part_files(node)
    assert not list((node.state_dir / "spool").glob("**/*.dcm"))


@SQLITE_ONLY
def test_requests_past_stow_max_concurrent_requests_are_answered_503(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path]
) -> None:
    node = start_stow_node(node_factory, stow_max_concurrent_requests=1)
    single = multipart([phantom_series[0].read_bytes()])
    held = open_upload(node, single[:1000], len(single))
    wait_part_files(node, 1)
    refused = stow(node, multipart([phantom_series[1].read_bytes()]))
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "60"
    assert "as many requests as allowed are running" in node.log_text()

    answer = finish_upload(held, single[1000:])
    assert answer.status == 200
    assert stored_uids(answer) == [uid_of(phantom_series[0])]
    again = stow(node, multipart([phantom_series[1].read_bytes()]))
    assert again.status_code == 200


@SQLITE_ONLY
def test_none_stored_for_lack_of_resources_is_503_not_409(
    node_factory: Callable[..., NodeProcess], phantom_series: list[Path]
) -> None:
    """A701 (the spool cannot be written) for every part passes: 503, the client retries;
    a refused content stays 409 (test_stow_endpoint)."""
    node = start_stow_node(node_factory, roles="web")
    incoming = node.state_dir / "spool" / "incoming"
    if incoming.is_dir():
        incoming.rmdir()
    incoming.write_bytes(b"")  # a file where the spool's folder must be: writes fail
    body = multipart([path.read_bytes() for path in phantom_series[:2]])
    answer = stow(node, body)
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "60"
    assert failures(answer) == [(uid_of(path), SPOOL_WRITE_FAILED) for path in phantom_series[:2]]

    incoming.unlink()
    again = stow(node, body)
    assert again.status_code == 200
    assert referenced(again) == [uid_of(path) for path in phantom_series[:2]]
