"""The systemd units and the logrotate example in docs/ are valid and call real commands."""

from __future__ import annotations

import getpass
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
UNITS = sorted((DOCS / "systemd").glob("*.service"))
INSTALLED = "/opt/ct-denoise-node/venv/bin/denoise-node"
HERE = Path(sys.executable).with_name("denoise-node")


def _exec_lines(unit: Path) -> list[list[str]]:
    lines = unit.read_text().splitlines()
    starts = ("ExecStart=", "ExecStartPre=")
    return [shlex.split(line.split("=", 1)[1]) for line in lines if line.startswith(starts)]


def test_there_is_a_unit_per_role() -> None:
    commands = {cmd[1] for unit in UNITS for cmd in _exec_lines(unit) if cmd[1] != "db"}
    assert commands == {"serve", "work", "send"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_each_unit_runs_a_command_the_cli_has(unit: Path) -> None:
    for command in _exec_lines(unit):
        assert command[0] == INSTALLED
        done = subprocess.run(
            [str(HERE), *command[1:], "--help"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify warns (exit 0) on unknown keys, so any message at all fails the test."""
    paths = []
    for unit in UNITS:
        name = unit.name.replace("@.service", "@1.service")
        copy = tmp_path / name
        copy.write_text(unit.read_text().replace(INSTALLED, str(HERE)))
        paths.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="no logrotate")
def test_logrotate_example_parses(tmp_path: Path) -> None:
    """Parsed in debug mode (rotates nothing); the service account is swapped for this one."""
    config = tmp_path / "denoise-node"
    user = getpass.getuser()
    config.write_text(
        (DOCS / "logrotate.conf").read_text().replace("denoise denoise", f"{user} {user}")
    )
    done = subprocess.run(
        ["logrotate", "-d", "-s", str(tmp_path / "state"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "error" not in done.stderr.lower(), done.stderr
