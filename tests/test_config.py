"""Configuration: TOML plus DENOISE_NODE_* variables, clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.config import ConfigError, load_settings
from node.destinations import Destination, DicomWebDestination


def test_defaults_run_on_a_laptop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = load_settings()
    assert (settings.ae_title, settings.port, settings.settle_seconds) == ("DENOISE", 11112, 10.0)
    assert settings.db_url == f"sqlite:///{tmp_path / 'ct-denoise-node' / 'node.db'}"
    assert settings.spool == tmp_path / "ct-denoise-node" / "spool"
    assert (settings.min_slices, settings.strength) == (10, 1.0)
    assert settings.series_description_suffix == " [denoised]"
    assert settings.series_number_offset == 1000
    assert (settings.web_host, settings.web_port) == ("127.0.0.1", 8080)
    assert settings.providers[0] == "CUDAExecutionProvider"
    assert settings.model_file.name == "ct_denoise.onnx"


def test_environment_overrides_the_file_including_nested_destinations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        'ae_title = "FROMFILE"\nsettle_seconds = 3\n'
        '[destinations.pacs]\nae_title = "ORTHANC"\nhost = "pacs.local"\nport = 4242\n'
    )
    monkeypatch.setenv("DENOISE_NODE_AE_TITLE", "FROMENV")
    monkeypatch.setenv("DENOISE_NODE_DESTINATIONS__PACS__HOST", "10.0.0.9")
    settings = load_settings(config)
    assert settings.ae_title == "FROMENV"
    assert settings.settle_seconds == 3
    pacs = settings.destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "10.0.0.9", 4242)


PACS = '[destinations.pacs]\nae_title = "X"\nhost = "h"\nport = 1\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000", "port"),
        ('ae_title = "MUCH TOO LONG AE TITLE"', "ae_title"),
        ("strength = 1.5", "strength"),
        ('[destinations.pacs]\nae_title = "X"\nhost = "h"\nport = 0', "destinations.pacs.port"),
        ("no_such_key = 1", "no_such_key"),
        ('[[rules]]\nname = "r"\nseries_description = "("', "rules.0.series_description"),
        (PACS + 'viewer_url = "https://v/{name}"', "destinations.pacs.viewer_url"),
        (PACS + 'viewer_url = "javascript:x"', "destinations.pacs.viewer_url"),
        ("orphan_grace_seconds = 0", "orphan_grace_seconds: Value error, must be greater than 0"),
        ("orphan_grace_seconds = -5.0", "orphan_grace_seconds"),
    ],
)
def test_a_bad_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(config)


def test_rules_may_only_name_known_destinations(tmp_path: Path) -> None:
    config = tmp_path / "rules.toml"
    config.write_text('[[rules]]\nname = "chest"\ndestinations = ["archive"]\n')
    with pytest.raises(ConfigError, match="unknown destination 'archive'"):
        load_settings(config)


def test_invalid_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_storage_commitment_timers_are_per_destination_seconds() -> None:
    """Off by default; an hour to commit, asked again every five minutes; both settable."""
    plain = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    assert not plain.storage_commitment
    assert (plain.commitment_timeout_seconds, plain.commitment_retry_seconds) == (3600.0, 300.0)
    settings = load_settings(
        destinations={
            "pacs": {
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": 104,
                "storage_commitment": True,
                "commitment_timeout_seconds": 0.5,
            }
        }
    )
    assert settings.destinations["pacs"].storage_commitment
    assert settings.destinations["pacs"].commitment_timeout_seconds == 0.5
    with pytest.raises(ValidationError):
        Destination(ae_title="P", host="h", port=104, commitment_retry_seconds=0)


def test_a_dicomweb_destination_names_its_credentials_by_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        '[destinations.cloud]\nkind = "dicomweb"\nurl = "https://pacs.example/dicom-web/"\n'
        'token_env = "PACS_TOKEN"\n'
        '[destinations.pacs]\nae_title = "ORTHANC"\nhost = "pacs.local"\nport = 4242\n'
    )
    monkeypatch.setenv("DENOISE_NODE_DESTINATIONS__CLOUD__BATCH_INSTANCES", "4")
    settings = load_settings(config)
    cloud, pacs = settings.destinations["cloud"], settings.destinations["pacs"]
    assert isinstance(cloud, DicomWebDestination) and isinstance(pacs, Destination)
    assert (cloud.url, cloud.token_env, cloud.batch_instances) == (
        "https://pacs.example/dicom-web",
        "PACS_TOKEN",
        4,
    )
    assert (cloud.username_env, cloud.tls_ca_file) == (None, None)
    assert pacs.kind == "dicom"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('kind = "dicomweb"\nurl = "https://h/dw"\nport = 4242', 'port: only for kind = "dicom"'),
        (
            'ae_title = "X"\nhost = "h"\nport = 1\nurl = "https://h"',
            'url: only for kind = "dicomweb"',
        ),
        ('kind = "dicomweb"', r"destinations\.cloud\.url: Field required"),
        ('kind = "dicomweb"\nurl = "https://me:s3cret@h/dw"', "must not hold credentials"),
        ('kind = "dicomweb"\nurl = "ftp://h/dw"', "http:// or https://"),
        ('kind = "dicomweb"\nurl = "https://h:99999/dw"', "port must be a number 1 to 65535"),
        ('kind = "dicomweb"\nurl = "https://h:abc/dw"', "port must be a number 1 to 65535"),
        ('kind = "dicomweb"\nurl = "https://h:0/dw"', "port must be a number 1 to 65535"),
        ('kind = "dicomweb"\nurl = "https://h"\ntoken_env = "s3cret value"', "not the secret"),
        ('kind = "dicomweb"\nurl = "https://h"\nusername_env = "U"', "needs both username_env"),
        (
            'kind = "dicomweb"\nurl = "https://h"\ntoken_env = "T"\n'
            'username_env = "U"\npassword_env = "P"',
            "choose one authentication",
        ),
        ('kind = "dicom-web"', "'dicom', 'dicomweb'"),
    ],
)
def test_a_destination_of_the_wrong_shape_is_refused_clearly(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f"[destinations.cloud]\n{text}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings(config)
    assert "destinations.cloud" in str(raised.value)
    assert "s3cret" not in str(raised.value)
