"""The STOW-RS endpoint over real HTTP against a running node process.

A real client (Orthanc's DICOMweb plugin pushing a study to the node as a DICOMweb
server) and a plain multipart client (requests) for the error cases; the instances land
in the same spool and job table as C-STORE ones, on SQLite and PostgreSQL where the job
table is involved.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from devtools.node_process import NodeProcess
from devtools.orthanc import DICOMWEB_PLUGIN, OrthancServer
from devtools.tools import free_port
from node.jobs import JobState
from node.web.auth import hash_password
from node.web.multipart import MAX_PARTS, PART_SUFFIX, BodyTooLarge, PartsToFiles
from tests.test_web_guard import Browser, csrf_of

PASSWORD = "stow-secret"
TOKEN = "scanner-token-0123456789abcdef"
USERS = {"alice": "admin", "vera": "viewer", "scanner": "store"}
BOUNDARY = "denoise-stow-boundary"
DICOM_PARTS = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SOP_INSTANCE, FAILURE_REASON = "00081155", "00081197"
SPOOL_FULL, DATASET_MISMATCH = 0xA700, 0xA900
SOP_CLASS_NOT_SUPPORTED, PIXEL_DATA_INVALID = 0x0122, 0xC212
BODY_MB = 64


def web_users() -> list[dict[str, str]]:
    users = [
        {"name": name, "role": role, "password_hash": hash_password(PASSWORD)}
        for name, role in USERS.items()
    ]
    users[-1]["token_sha256"] = hashlib.sha256(TOKEN.encode()).hexdigest()
    return users


def start_stow_node(
    node_factory: Callable[..., NodeProcess], roles: str = "receive,web", **settings: Any
) -> NodeProcess:
    port = settings.pop("web_port", None) or free_port()
    node = node_factory(roles=roles, web_port=port, web_users=web_users(), **settings).start()
    node.wait_for(lambda: _healthy(port), 30, "the web role")
    node.web_port = port  # type: ignore[attr-defined]
    return node


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def multipart(parts: list[bytes]) -> bytes:
    body = b"".join(
        b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
        for part in parts
    )
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


def stow(
    node: NodeProcess,
    body: bytes | Iterator[bytes],
    *,
    user: str | None = "scanner",
    password: str = PASSWORD,
    content_type: str = DICOM_PARTS,
    path: str = "/dicomweb/studies",
    headers: dict[str, str] | None = None,
) -> requests.Response:
    port = node.web_port  # type: ignore[attr-defined]
    return requests.post(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"}
        | (headers or {}),
        auth=(user, password) if user else None,
        timeout=60,
    )


def referenced(answer: requests.Response) -> list[str]:
    items = answer.json().get("00081199", {}).get("Value", [])
    return [item[SOP_INSTANCE]["Value"][0] for item in items]


def failures(answer: requests.Response) -> list[tuple[str | None, int]]:
    items = answer.json().get("00081198", {}).get("Value", [])
    return [
        (item.get(SOP_INSTANCE, {}).get("Value", [None])[0], item[FAILURE_REASON]["Value"][0])
        for item in items
    ]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_posted_series_is_stored_and_settles_into_a_job(
    node_factory, phantom_series: list[Path]
) -> None:
    node = start_stow_node(node_factory)
    answer = stow(node, multipart([path.read_bytes() for path in phantom_series]))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    assert sorted(referenced(answer)) == sorted(uid_of(path) for path in phantom_series)
    assert failures(answer) == []

    series_uid = str(pydicom.dcmread(phantom_series[0]).SeriesInstanceUID)
    node.wait_for(lambda: bool(node.queries.list_jobs()), 30, "the series to settle")
    (job,) = node.queries.list_jobs()
    assert (job.series_instance_uid, job.instance_count) == (series_uid, len(phantom_series))
    assert job.calling_ae_title == "scanner"
    assert job.state == JobState.QUEUED  # no work role here: it waits for a worker
    posted = {uid_of(path): path.read_bytes() for path in phantom_series}
    recorded = {row.sop_instance_uid: row for row in node.queries.series_instances(series_uid)}
    for uid, data in posted.items():  # hashed as streamed: the digest of the posted bytes
        assert (recorded[uid].sha256, recorded[uid].size_bytes) == (
            hashlib.sha256(data).hexdigest(),
            len(data),
        )

    again = stow(
        node,
        multipart([phantom_series[0].read_bytes()]),
        user=None,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert again.status_code == 200 and referenced(again) == [uid_of(phantom_series[0])]


def test_each_bad_part_fails_on_its_own(
    node_factory, phantom_series: list[Path], tmp_path: Path
) -> None:
    node = start_stow_node(node_factory)
    good = phantom_series[0].read_bytes()
    truncated = phantom_series[1].read_bytes()[:-2000]
    mr = pydicom.dcmread(phantom_series[2])
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    buffer = io.BytesIO()
    mr.save_as(buffer, enforce_file_format=True)

    answer = stow(node, multipart([good, truncated, buffer.getvalue()]))
    assert answer.status_code == 202, answer.text
    assert referenced(answer) == [uid_of(phantom_series[0])]
    assert failures(answer) == [
        (uid_of(phantom_series[1]), PIXEL_DATA_INVALID),
        (str(mr.SOPInstanceUID), SOP_CLASS_NOT_SUPPORTED),
    ]
    log = node.log_text()
    assert "STOW-RS refused: PixelData has" in log
    assert str(mr.PatientName) not in log

    other_study = stow(node, multipart([good]), path="/dicomweb/studies/1.2.826.0.1.99")
    assert other_study.status_code == 409
    assert failures(other_study) == [(uid_of(phantom_series[0]), DATASET_MISMATCH)]


def test_below_the_disk_watermark_the_request_is_refused_before_its_body(
    node_factory, phantom_series: list[Path]
) -> None:
    node = start_stow_node(node_factory, spool_min_free_mb=10**9)
    answer = stow(node, multipart([path.read_bytes() for path in phantom_series[:3]]))
    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] == "60"
    assert node.queries.list_jobs() == []
    assert not list((node.state_dir / "spool").glob("**/*.dcm"))


@SQLITE_ONLY
def test_who_may_store(node_factory, phantom_series: list[Path]) -> None:
    node = start_stow_node(node_factory, web_login_delay_seconds=0.0)
    port = node.web_port  # type: ignore[attr-defined]
    body = multipart([phantom_series[0].read_bytes()])
    assert stow(node, body, user=None).status_code == 401
    assert stow(node, body, password="wrong").status_code == 401
    assert stow(node, body, user=None, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert stow(node, body, user="vera").status_code == 403
    assert stow(node, body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert stow(node, body, user="alice").status_code == 200
    # A store account sees neither the API nor the dashboard, and cannot log in there.
    api = requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", auth=("scanner", PASSWORD))
    assert api.status_code == 403
    page = requests.get(f"http://127.0.0.1:{port}/", auth=("scanner", PASSWORD))
    assert page.status_code == 403
    assert requests.get(f"http://127.0.0.1:{port}/api/v1/jobs", auth=("vera", PASSWORD)).ok
    browser = Browser(port)
    form = browser.get("/login")
    entered = browser.post(
        "/login",
        data={"username": "scanner", "password": PASSWORD, "csrf_token": csrf_of(form.text)},
    )
    assert entered.status_code == 303 and entered.headers["location"].endswith("/login")
    assert "denoise_node_session" not in browser.cookies


@SQLITE_ONLY
def test_wrong_passwords_and_tokens_are_throttled(node_factory, phantom_series: list[Path]) -> None:
    node = start_stow_node(
        node_factory,
        web_login_delay_seconds=30.0,
        web_login_max_delay_seconds=30.0,
    )
    body = multipart([phantom_series[0].read_bytes()])
    guess = "guess-7f3a9c"
    assert stow(node, body, password=guess).status_code == 401
    refused = stow(node, body, password=guess)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    bearer = {"Authorization": f"Bearer {guess}"}
    assert stow(node, body, user=None, headers=bearer).status_code == 401
    assert stow(node, body, user=None, headers=bearer).status_code == 429
    assert (
        stow(node, body, user=None, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429
    )
    assert guess not in node.log_text()


@SQLITE_ONLY
def test_requests_that_are_not_stow_bodies(node_factory, phantom_series: list[Path]) -> None:
    node = start_stow_node(node_factory, stow_max_request_mb=1)
    part = phantom_series[0].read_bytes()
    json_parts = f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}'
    assert stow(node, multipart([part]), content_type="application/dicom").status_code == 415
    assert stow(node, multipart([part]), content_type=json_parts).status_code == 415
    no_boundary = 'multipart/related; type="application/dicom"'
    assert stow(node, multipart([part]), content_type=no_boundary).status_code == 400
    cut_off = multipart([part])[: len(part) // 2]
    assert stow(node, cut_off).status_code == 400
    assert stow(node, b"no multipart here at all").status_code == 400
    assert stow(node, multipart([part] * 40)).status_code == 413
    chunked = (multipart([part] * 40)[i : i + 65536] for i in range(0, 40 * len(part), 65536))
    assert stow(node, chunked).status_code == 413  # no Content-Length: counted as it streams
    assert stow(node, multipart([part]), path="/dicomweb/studies/not-a-uid").status_code == 400
    assert node.queries.list_jobs() == []
    assert not list((node.state_dir / "spool").glob("**/*.dcm"))
    assert not list((node.state_dir / "spool" / "stow").rglob(f"*{PART_SUFFIX}"))


@SQLITE_ONLY
def test_a_large_body_streams_to_disk_not_into_memory(
    node_factory, phantom_series: list[Path]
) -> None:
    """64 MB posted without Content-Length (chunked): the node's peak memory grows by far
    less than the body, so the body never was in memory whole."""
    node = start_stow_node(node_factory)
    part = multipart([phantom_series[0].read_bytes()])
    warm = stow(node, part)  # imports and connections are not what is measured
    assert warm.status_code == 200
    assert node.process is not None
    before = peak_rss_bytes(node.process.pid)
    copies = BODY_MB * 2**20 // len(part)
    single = part.removesuffix(b"--" + BOUNDARY.encode() + b"--\r\n")
    chunks = (single for _ in range(copies))
    answer = stow(node, itertools.chain(chunks, [b"--" + BOUNDARY.encode() + b"--\r\n"]))
    assert answer.status_code == 200, answer.text[:300]
    assert len(referenced(answer)) == copies  # the same instance, stored once, listed each time
    growth = peak_rss_bytes(node.process.pid) - before
    print(f"peak RSS growth for a {BODY_MB} MB body: {growth / 2**20:.1f} MiB")
    assert growth < BODY_MB // 2 * 2**20


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@SQLITE_ONLY
def test_addresses_outside_the_allow_list_may_not_store(
    node_factory, phantom_series: list[Path]
) -> None:
    node = start_stow_node(node_factory, roles="web", allowed_addresses=["10.0.0.0/8"])
    answer = stow(node, multipart([phantom_series[0].read_bytes()]), user="alice")
    assert answer.status_code == 403
    assert "address not in allowed_addresses" in node.log_text()


@pytest.mark.orthanc  # starts its own Orthanc (with the DICOMweb plugin)
def test_orthanc_pushes_a_study_that_comes_back_denoised(
    node_factory, phantom_series: list[Path], tmp_path: Path
) -> None:
    """Orthanc's DICOMweb plugin posts a study to the node (STOW-RS); the derived series
    comes back to the same Orthanc as a C-STORE PACS, each instance once."""
    web_port = free_port()
    server = {
        "Url": f"http://127.0.0.1:{web_port}/dicomweb/",
        "Username": "scanner",
        "Password": PASSWORD,
    }
    extra = {"DicomWeb": {"Enable": True, "Servers": {"node": server}}}
    with OrthancServer(
        tmp_path / "orthanc", plugins=[DICOMWEB_PLUGIN], extra_config=extra
    ) as orthanc:
        destination = {
            "ae_title": orthanc.ae_title,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
        node = start_stow_node(
            node_factory,
            roles="receive,work,send,web",
            web_port=web_port,
            destinations={"pacs": destination},
        )
        for path in phantom_series:
            uploaded = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), timeout=30)
            uploaded.raise_for_status()
        study = uploaded.json()["ParentStudy"]
        pushed = requests.post(
            f"{orthanc.url}/dicom-web/servers/node/stow",
            json={"Resources": [study], "Synchronous": True},
            timeout=120,
        )
        assert pushed.ok, pushed.text

        (job,) = node.wait_jobs_final(1)
        assert job.state == JobState.DONE, job.last_error
        assert job.instance_count == len(phantom_series)
        derived = orthanc.series_instances(job.output_series_uid)
        assert len(derived) == len(phantom_series)
        assert orthanc.count_instances() == 2 * len(phantom_series)
        assert "STOW-RS from web:scanner" in node.log_text()


def test_a_body_of_too_many_parts_is_refused_before_it_makes_their_files(tmp_path: Path) -> None:
    parts = PartsToFiles(tmp_path / "stow", BOUNDARY.encode(), max_bytes=2**30)
    with pytest.raises(BodyTooLarge, match="parts"):
        parts.write(multipart([b"x"] * (MAX_PARTS + 1)))
    assert len(list((tmp_path / "stow").iterdir())) == MAX_PARTS
    parts.close()
    assert not list((tmp_path / "stow").iterdir())
