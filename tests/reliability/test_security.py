"""Nobody let in who should not be, nothing said about the patient.

An allow-list of calling AE titles and source networks rejects unknown callers at
association (A-ASSOCIATE-RJ, logged with AE title and address, nothing stored); DICOM
over TLS is checked with DCMTK's ``storescu +tls`` and certificates the test makes
with ``openssl``, with and without a client certificate; and every line the node
logs at DEBUG level is searched for a patient's name, ID and birth date.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from devtools.orthanc import OrthancServer
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.association_request import request_association
from node.config import ConfigError, load_settings
from node.jobs import JobState
from node.receiver import PIXEL_DATA_INVALID
from tests.fixtures.dicom import STORE_STATUS, storescu, storescu_profile
from tests.reliability.checks import (
    count_instances,
    pacs,
    send_raw,
    series_uid,
    wait_series_done,
)

#: node tests run on SQLite: who may connect does not depend on the job table's backend
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def phantom(folder: Path, seed: int, slices: int = 6, **spec) -> list[Path]:
    return write_phantom_series(
        folder / f"series-{seed}",
        PhantomSpec(slices=slices, size=64, seed=seed, series_description=f"Sec {seed}", **spec),
    )


def rejections(node) -> list[dict]:
    """The node's JSON log lines about rejected associations."""
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if "rejected" in line["message"]]


def associate_from(port: int, calling_ae: str, source: str) -> bool:
    """Whether an association from ``source`` (a loopback address) as ``calling_ae`` opens."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc, rejection = request_association(
        ae, "127.0.0.1", port, ae_title="DENOISE", bind_address=(source, 0)
    )
    established = assoc.is_established
    if established:
        assoc.release()
    else:
        assert rejection, "refused callers get an A-ASSOCIATE-RJ, not a dropped socket"
        assert rejection.permanent and "Service User" in rejection.words
    return established


@SQLITE
def test_unknown_calling_ae_title_is_rejected_at_association(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    # ECHOSCU: the fixture's readiness probe (DCMTK echoscu's default calling AE title)
    node = node_factory(allowed_calling_ae_titles=["SCANNER", "CT2", "ECHOSCU"]).start()
    paths = phantom(tmp_path, 1)
    assert storescu(node.port, paths, calling_ae="INTRUDER") == []
    assert count_instances(node) == 0
    assert not associate_from(node.port, "INTRUDER", "127.0.0.1")
    (logged, *_) = rejections(node)
    assert "INTRUDER" in logged["message"] and "127.0.0.1" in logged["message"]
    assert logged["calling_ae"] == "INTRUDER" and logged["peer_address"] == "127.0.0.1"

    assert storescu(node.port, paths, calling_ae="SCANNER") == [0] * len(paths)
    assert count_instances(node) == len(paths)


@SQLITE
def test_unknown_source_address_is_rejected_at_association(
    node_factory, tmp_path: Path, db_url: str
) -> None:
    node = node_factory(allowed_addresses=["127.0.0.1/32", "10.20.0.0/16"]).start()
    assert not associate_from(node.port, "SCANNER", "127.0.0.2")
    (logged,) = rejections(node)
    assert logged["peer_address"] == "127.0.0.2" and "allowed_addresses" in logged["message"]
    assert associate_from(node.port, "SCANNER", "127.0.0.1")
    paths = phantom(tmp_path, 2, slices=2)
    assert send_raw(node.port, paths, calling_ae="SCANNER") == [0, 0]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"allowed_addresses": ["10.0.0.300/8"]}, "not an IP network"),
        ({"allowed_calling_ae_titles": ["A\\B"]}, "AE title"),
        ({"tls_port": 2762}, "tls_port needs tls_cert_file and tls_key_file"),
        ({"tls_require_client_cert": True}, "needs tls_ca_file"),
    ],
)
def test_security_settings_are_checked_at_start(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(None, **values)


def test_allowed_addresses_are_normalised_networks() -> None:
    settings = load_settings(None, allowed_addresses=["192.168.1.7", "10.20.30.40/16"])
    assert settings.allowed_addresses == ["192.168.1.7/32", "10.20.0.0/16"]


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""
    folder = tmp_path_factory.mktemp("pki")
    files = {name: folder / f"{name}.pem" for name in ("ca", "ca-key", "server", "server-key")}
    files.update({name: folder / f"{name}.pem" for name in ("client", "client-key")})
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA",
        "-keyout", str(files["ca-key"]), "-out", str(files["ca"]),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign",
    )  # fmt: skip
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", None)):
        request = folder / f"{name}.csr"
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", str(files[f"{name}-key"]), "-out", str(request),
        )  # fmt: skip
        extra = ["-copy_extensions", "copy"] if extension else []
        openssl(
            "x509", "-req", "-in", str(request), "-CA", str(files["ca"]),
            "-CAkey", str(files["ca-key"]), "-CAcreateserial", "-days", "1",
            "-out", str(files[name]), *extra,
            *(["-extfile", str(_extfile(folder, extension))] if extension else []),
        )  # fmt: skip
    return files


def _extfile(folder: Path, extension: str) -> Path:
    path = folder / "server.ext"
    path.write_text(extension + "\n", encoding="ascii")
    return path


def tls_storescu(port: int, paths: list[Path], tls: list[str], folder: Path) -> list[int]:
    """DCMTK storescu over TLS (``tls`` are its TLS options); the C-STORE statuses."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [dcmtk_tool("storescu"), "-d", "-aet", "SCANNER", *tls]
    command += ["-xf", str(storescu_profile(folder)), "CT", "127.0.0.1", str(port)]
    done = subprocess.run(
        [*command, *map(str, paths)], env=DCMTK_ENV, capture_output=True, text=True, timeout=120
    )
    return [int(code, 16) for code in STORE_STATUS.findall(done.stdout + done.stderr)]


@SQLITE
@pytest.mark.parametrize("mutual", [False, True], ids=["server-auth", "mutual-tls"])
def test_dicom_over_tls_with_dcmtk_storescu(
    node_factory, tmp_path: Path, db_url: str, certificates: dict[str, Path], mutual: bool
) -> None:
    tls_port = free_port()
    node = node_factory(
        tls_port=tls_port,
        tls_cert_file=str(certificates["server"]),
        tls_key_file=str(certificates["server-key"]),
        tls_ca_file=str(certificates["ca"]),
        tls_require_client_cert=mutual,
    ).start()
    with_cert = ["+tls", str(certificates["client-key"]), str(certificates["client"])]
    with_cert += ["+cf", str(certificates["ca"])]
    anonymous = ["+tla", "+cf", str(certificates["ca"])]

    paths = phantom(tmp_path, 3)
    assert tls_storescu(tls_port, paths, with_cert, tmp_path / "a") == [0] * len(paths)
    others = phantom(tmp_path, 4, slices=2)
    without = tls_storescu(tls_port, others, anonymous, tmp_path / "b")
    assert without == ([] if mutual else [0, 0]), "a client without a certificate"
    assert storescu(tls_port, others) == [], "plain DICOM on the TLS port"
    assert count_instances(node) == len(paths) + len(without)
    # The plain port serves as before, beside the TLS one.
    assert storescu(node.port, others) == [0, 0]
    job = wait_series_done(node, series_uid(paths[0]), len(paths))
    assert job.state == JobState.DONE, job.last_error


@SQLITE
def test_an_idle_connection_does_not_block_the_tls_port(
    node_factory, tmp_path: Path, db_url: str, certificates: dict[str, Path]
) -> None:
    """A caller that connects and never starts its handshake must not hold up the others."""
    tls_port = free_port()
    node_factory(
        tls_port=tls_port,
        tls_cert_file=str(certificates["server"]),
        tls_key_file=str(certificates["server-key"]),
        tls_ca_file=str(certificates["ca"]),
    ).start()
    with socket.create_connection(("127.0.0.1", tls_port)):
        paths = phantom(tmp_path, 7, slices=2)
        tls = ["+tla", "+cf", str(certificates["ca"]), "-to", "20", "-ta", "20"]
        assert tls_storescu(tls_port, paths, tls, tmp_path / "c") == [0, 0]


SECRETS = {
    "PatientName": "QQSECRETSURNAME^QQSECRETGIVEN",
    "PatientID": "PIDQQ-99173",
    "PatientBirthDate": "1943-11-17",  # a malformed DA, as real archives hold: pydicom warns
    "OtherPatientIDs": "OTHERQQ-5521",
}


@SQLITE
def test_no_patient_data_in_any_log_line(
    node_factory, orthanc: OrthancServer, tmp_path: Path, db_url: str
) -> None:
    node = node_factory(destinations=pacs(orthanc), log_level="DEBUG").start()

    def named(paths: list[Path]) -> list[Path]:
        for path in paths:
            ds = pydicom.dcmread(path)
            for keyword, value in SECRETS.items():
                setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format=False)
        return paths

    good = named(phantom(tmp_path, 5))
    assert storescu(node.port, good) == [0] * len(good)
    bad = named(phantom(tmp_path, 6))
    for path in bad:  # a job that fails on its rescale: its error is logged
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = 0
        ds.save_as(path, enforce_file_format=False)
    assert send_raw(node.port, bad) == [0] * len(bad)
    short = named(phantom(tmp_path, 8, slices=1))[0]  # refused on its pixel data: logged
    ds = pydicom.dcmread(short)
    ds.PixelData = b"\0" * 10
    ds.save_as(short, enforce_file_format=False)
    assert send_raw(node.port, [short]) == [PIXEL_DATA_INVALID]
    conflicting = tmp_path / "conflicting.dcm"
    ds = pydicom.dcmread(good[0])
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(conflicting)
    refused = tmp_path / "refused.dcm"
    ds.SeriesInstanceUID = SECRETS["PatientName"]  # an identity where a UID should be
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    ds.save_as(refused, enforce_file_format=False)

    assert wait_series_done(node, series_uid(good[0]), len(good)).state == JobState.DONE
    assert wait_series_done(node, series_uid(bad[0]), len(bad)).state == JobState.FAILED
    assert storescu(node.port, [conflicting]) == [0]
    assert send_raw(node.port, [refused]) != [0]
    node.stop()

    text = node.log_text()
    assert series_uid(good[0]) in text and "DEBUG" in text and "DIFFERENT content" in text
    for value in [*SECRETS.values(), "QQSECRETSURNAME", "QQSECRETGIVEN", "19431117", "PIDQQ"]:
        assert value not in text, f"{value!r} appears in the node's log"
