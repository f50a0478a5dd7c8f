"""STOW-RS ingest: one CT series posted to the node's endpoint, beside storescu into its receiver.

``python -m bench.stow [--quick] [--slices N] [--repeat N] [--backend sqlite|postgresql]``

The node runs as ``denoise-node serve --roles receive,web`` on a fresh job table per run,
durability on (every instance fsynced with its folder and recorded before it is listed as
stored) and a settle time so long that no job is made during the run.  Three ways in,
interleaved: the whole series in one STOW-RS request, one STOW-RS request per instance
(on one kept-alive connection), and DCMTK storescu in one association (the C-STORE
baseline, same node, same disk).  STOW-RS clients authenticate with a bearer token; one
more row posts the whole series with HTTP Basic, which costs one scrypt password hash per
request.  Before the clock starts each node stores one warm-up instance of another series
the same way (first-request imports and connections are not the figure).  Times are the
client's, from its first byte to the last answer; each run checks that the job table holds
every instance.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from bench import common
from devtools.tools import free_port
from node.web.auth import hash_password

NO_SETTLE = 86400.0
BOUNDARY = "bench-stow-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
USER, PASSWORD, TOKEN = "bench", "bench-password", "bench-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: A way in: (DICOM port, web port, files, HTTP Basic rather than the token) -> seconds.
Send = Callable[[int, int, Sequence[Path], bool], float]


def multipart(paths: Sequence[Path]) -> bytes:
    head = b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    body = b"".join(head + path.read_bytes() + b"\r\n" for path in paths)
    return body + b"--" + BOUNDARY.encode() + b"--\r\n"


def _post(session: requests.Session, web_port: int, body: bytes, basic: bool) -> None:
    answer = session.post(
        f"http://127.0.0.1:{web_port}/dicomweb/studies",
        data=body,
        headers={"Content-Type": CONTENT_TYPE} | ({} if basic else BEARER),
        auth=(USER, PASSWORD) if basic else None,
        timeout=600,
    )
    if answer.status_code != 200:
        raise common.CannotRun(f"STOW-RS answered {answer.status_code}: {answer.text[:500]}")


def one_request(_port: int, web_port: int, paths: Sequence[Path], basic: bool) -> float:
    body = multipart(paths)  # built before the clock starts: the client's file reads
    with requests.Session() as session:
        started = time.perf_counter()
        _post(session, web_port, body, basic)
        return time.perf_counter() - started


def per_instance(_port: int, web_port: int, paths: Sequence[Path], basic: bool) -> float:
    bodies = [multipart([path]) for path in paths]
    with requests.Session() as session:
        started = time.perf_counter()
        for body in bodies:
            _post(session, web_port, body, basic)
        return time.perf_counter() - started


def c_store(port: int, _web_port: int, paths: Sequence[Path], _basic: bool) -> float:
    return common.storescu(port, paths, "DENOISE")


def measure(backend: str, way: tuple[Send, bool], paths: Sequence[Path], warm_up: Path) -> float:
    """One run on a fresh node and job table; the client's seconds."""
    send, basic = way
    web_port = free_port()
    token = hashlib.sha256(TOKEN.encode()).hexdigest()
    users = [
        {
            "name": USER,
            "role": "store",
            "password_hash": hash_password(PASSWORD),
            "token_sha256": token,
        }
    ]
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as name:
        folder = Path(name)
        with (
            common.database(backend, folder) as url,
            common.node_process(
                folder,
                url,
                "receive,web",
                settle_seconds=NO_SETTLE,
                web_port=web_port,
                web_users=users,
                web_login_delay_seconds=0.0,
            ) as node,
        ):
            node.wait_for(lambda: _healthy(web_port), 30, "the web role")
            send(node.port, web_port, [warm_up], basic)
            seconds = send(node.port, web_port, paths, basic)
            stored = node.queries.instance_totals()[0] - 1
            if stored != len(paths):
                raise common.CannotRun(f"the node recorded {stored} of {len(paths)} instances")
            node.stop()
            return seconds


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def benchmark(args: argparse.Namespace) -> None:
    count = common.slices(args)
    repeat = args.repeat or (1 if args.quick else 3)
    paths = common.phantom_series(count)
    warm_up = common.phantom_series(1, seed=1)[0]
    ways: dict[str, tuple[Send, bool]] = {
        "STOW-RS, one request (bearer token)": (one_request, False),
        "STOW-RS, one request (HTTP Basic)": (one_request, True),
        "STOW-RS, one request per instance (bearer token)": (per_instance, False),
        "C-STORE, storescu, one association": (c_store, False),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for run in range(repeat):
        for name, way in ways.items():
            common.progress(f"run {run + 1}/{repeat}: {name}")
            times[name].append(measure(args.backend, way, paths, warm_up))
    megabytes = common.megabytes(paths)
    baseline = statistics.median(times["C-STORE, storescu, one association"])
    rows = []
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            [
                name,
                f"{median:.2f}",
                f"{count / median:.1f}",
                f"{megabytes / median:.1f}",
                f"{baseline / median:.2f}",
            ]
        )
    common.print_table(
        f"{count} slices of 512 x 512 ({megabytes:.1f} MB) into the node on {args.backend}, "
        f"median of {repeat}",
        ["way in", "seconds", "instances/s", "MB/s", "speed vs C-STORE"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(__doc__.splitlines()[0], full_slices=48)
    options.add_argument("--repeat", type=int, help="runs per way in (default 3, 1 with --quick)")
    options.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    return common.run("STOW-RS benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
