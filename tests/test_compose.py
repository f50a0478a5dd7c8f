"""docker-compose.yml and the Dockerfile agree with the code: variables, commands, ports.

No Docker engine runs on CI, so this checks what `docker compose config` cannot: that
every DENOISE_NODE_* variable is a real setting and every command a real sub-command.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser
from node.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
NODE_SERVICES = ["migrate", "node", "worker"]


def interpolate(value: object) -> str:
    """What compose does to ``${NAME:-default}`` when NAME is unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


@pytest.mark.parametrize("service", NODE_SERVICES)
def test_environment_is_a_valid_node_configuration(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = COMPOSE["services"][service]["environment"]
    for key, value in environment.items():
        assert key.startswith("DENOISE_NODE_"), key
        monkeypatch.setenv(key, interpolate(value))
    settings = load_settings()
    assert settings.db_url.startswith("postgresql+psycopg://")
    assert settings.destinations["pacs"].host == "orthanc"
    ports = COMPOSE["services"]["node"]["ports"]
    assert any(p.endswith(f":{settings.port}") for p in ports)
    assert any(p.endswith(f":{settings.web_port}") for p in ports)


@pytest.mark.parametrize("service", NODE_SERVICES)
def test_command_is_a_real_subcommand(service: str) -> None:
    command = COMPOSE["services"][service]["command"]
    args = build_parser().parse_args(command)
    assert callable(args.func)


def test_roles_follow_the_decisions() -> None:
    assert COMPOSE["services"]["node"]["command"] == ["serve", "--roles", "receive,send,web"]
    assert COMPOSE["services"]["worker"]["command"] == ["work"]
    reservation = COMPOSE["services"]["worker"]["deploy"]["resources"]["reservations"]
    assert reservation["devices"][0]["capabilities"] == ["gpu"]
    orthanc_modalities = COMPOSE["services"]["orthanc"]["environment"]["ORTHANC__DICOM_AET"]
    assert orthanc_modalities == COMPOSE["x-node-env"]["DENOISE_NODE_DESTINATIONS__PACS__AE_TITLE"]


def test_dockerfile_installs_the_package_with_its_model() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY node node" in dockerfile and "SHIPPED_MODEL.is_file()" in dockerfile
    assert 'ENTRYPOINT ["denoise-node"]' in dockerfile
