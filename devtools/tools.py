"""External programs and ports the demo, the tests and the benchmarks rely on."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def dcmtk_tool(name: str) -> str:
    """The DCMTK binary ``name`` on PATH, skipping same-named Python scripts.

    pynetdicom installs its own ``storescu``/``echoscu`` into the virtual environment,
    which comes first on PATH when it is activated; we mean DCMTK's.
    """
    folders = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]
    for folder in folders:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with open(candidate, "rb") as handle:
                if handle.read(2) != b"#!":
                    return str(candidate)
    raise FileNotFoundError(f"DCMTK {name} not found: apt-get install dcmtk")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: DCMTK waits for delayed ACKs (about 40 ms per instance) unless told not to.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
