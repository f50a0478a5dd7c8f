"""The node as a real process (``denoise-node serve``), for the demo, the tests and the
benchmarks alike: one TOML writer, one process wrapper.

The process reads a generated TOML config, listens on its port and logs to a file that
callers can read (and grep for patient data).  ``kill()`` is a real SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.tools import DCMTK_ENV, dcmtk_tool
from node import db
from node.jobs import FINAL_STATES, JobManager, JobQueries, WorkerRegistry
from node.jobs.records import JobView


class NodeExited(RuntimeError):
    """The node process ended while it was expected to run; the message holds its log."""


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal: bool, number, string (quoted), list of these."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    """Write a flat-or-one-level-nested settings dict (``destinations.pacs``) as TOML; a
    list of dicts (``web_users``) is an array of tables."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in settings.items():
        if isinstance(value, dict):
            for name, table in value.items():
                tables.append(f"\n[{key}.{name}]")
                tables.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for table in value:
                tables.append(f"\n[[{key}]]")
                tables.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        else:
            lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines + tables) + "\n", encoding="utf-8")
    return path


def echo(port: int, ae_title: str) -> bool:
    """True when DCMTK ``echoscu`` gets a C-ECHO answer from ``ae_title`` on ``port``."""
    result = subprocess.run(
        [dcmtk_tool("echoscu"), "-aec", ae_title, "-to", "2", "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@dataclass
class NodeProcess:
    """A ``denoise-node serve --roles ROLES`` child process and the job table it writes.

    As a context manager it is started on entry and stopped on exit (SIGTERM, then
    SIGKILL after ``grace_seconds``).
    """

    config: Path
    state_dir: Path
    port: int
    db_url: str
    roles: str
    log_path: Path
    ae_title: str = "DENOISE"
    grace_seconds: float = 30.0
    process: subprocess.Popen[bytes] | None = None
    manager: JobManager = field(init=False)
    queries: JobQueries = field(init=False)
    registry: WorkerRegistry = field(init=False)

    def __post_init__(self) -> None:
        self._engine = db.make_engine(self.db_url)
        sessions = db.session_factory(self._engine)
        self.manager = JobManager(sessions)
        self.queries = JobQueries(sessions)
        self.registry = WorkerRegistry(sessions)

    def start(self, own_session: bool = False) -> NodeProcess:
        """Start the process; with ``receive``, return once it answers C-ECHO.

        ``own_session``: Ctrl-C in the terminal reaches only the caller, which then
        stops the node in order (the demo).
        """
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--config", str(self.config)]
                + ["--log-format", "json", "serve", "--roles", self.roles],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=own_session,
            )
        if "receive" in self.roles:
            self.wait_listening()
        return self

    def __enter__(self) -> NodeProcess:
        return self.start(own_session=True)

    def __exit__(self, *exc: object) -> None:
        self.close(self.grace_seconds)

    def wait_listening(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda: echo(self.port, self.ae_title), timeout, f"C-ECHO on {self.port}")

    def check_alive(self) -> None:
        """Raise NodeExited (with the log's tail) when the process has ended."""
        if self.process is not None and self.process.poll() is not None:
            raise NodeExited(f"the node exited ({self.process.returncode}):\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path of ``docker stop``; the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash at an arbitrary point."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_text()[-chars:]
        except OSError:
            return "(no log)"

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 120.0, what: str = "condition"
    ) -> None:
        """Poll ``predicate`` until true; NodeExited or TimeoutError with the log's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            self.check_alive()
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.log_tail()}")

    def wait_jobs_final(self, count: int, timeout: float = 180.0) -> list[JobView]:
        def finished() -> bool:
            jobs = self.queries.list_jobs(limit=1000)
            return len(jobs) >= count and all(j.state in FINAL_STATES for j in jobs)

        self.wait_for(finished, timeout, f"{count} finished jobs")
        return self.queries.list_jobs(limit=1000)

    def close(self, grace_seconds: float = 0.0) -> None:
        """End the process if it still runs (SIGTERM first when ``grace_seconds`` > 0)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            if grace_seconds > 0:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(grace_seconds)
            if process.poll() is None:
                process.kill()
                process.wait(10)
        self._engine.dispose()
