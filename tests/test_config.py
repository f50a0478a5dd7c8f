"""Configuration: TOML plus DENOISE_NODE_* variables, clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from node.config import ConfigError, Destination, load_settings


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


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("port = 70000", "port"),
        ('ae_title = "MUCH TOO LONG AE TITLE"', "ae_title"),
        ("strength = 1.5", "strength"),
        ('[destinations.pacs]\nae_title = "X"\nhost = "h"\nport = 0', "destinations.pacs.port"),
        ("no_such_key = 1", "no_such_key"),
        ('[[rules]]\nname = "r"\nseries_description = "("', "rules.0.series_description"),
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


def test_storage_commitment_is_refused_until_the_node_requests_it() -> None:
    """Nothing would ever mark a delivery committed, so retention would keep every file."""
    with pytest.raises(ValidationError, match="storage commitment is not requested"):
        Destination(ae_title="PACS", host="127.0.0.1", port=104, storage_commitment=True)
    assert not Destination(ae_title="PACS", host="127.0.0.1", port=104).storage_commitment
