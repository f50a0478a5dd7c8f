"""What every benchmark shares: cached phantom series, job tables, node processes, storescu,
peak memory, the machine's description and the printed tables.

Tables are Markdown, so the latest figures can be pasted into the README as printed.
Progress goes to stderr, the tables to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime as ort

from devtools.databases import DatabaseUnavailable, temporary_database
from devtools.node_process import NodeProcess, write_config
from devtools.onnx_models import write_mean_filter_model
from devtools.phantom import PhantomSpec, write_phantom_series
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node.config import SHIPPED_MODEL

CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ct-denoise-node" / "bench"
)
SIZE = 512
FULL_SLICES = 300
QUICK_SLICES = 12
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
T = TypeVar("T")


class CannotRun(Exception):
    """The benchmark cannot run here (a tool, server or model is missing, a peer failed)."""


# -- inputs ------------------------------------------------------------------------------


def phantom_series(slices: int, seed: int = 0) -> list[Path]:
    """A cached 512 x 512 phantom series; another ``seed`` is another series (and study)."""
    folder = CACHE / f"phantom-{SIZE}px-{slices}-seed{seed}"
    complete = folder / "complete"
    if not complete.exists():
        shutil.rmtree(folder, ignore_errors=True)
        progress(f"writing phantom series {seed} ({slices} slices) to {folder}")
        spec = PhantomSpec(slices=slices, size=SIZE, seed=seed, patient_id=f"BENCH-{seed:04d}")
        write_phantom_series(folder, spec)
        complete.touch()
    return sorted(folder.glob("*.dcm"))


def megabytes(paths: Sequence[Path]) -> float:
    """Total size of ``paths`` in MB (10^6 bytes)."""
    return sum(path.stat().st_size for path in paths) / 1e6


def model_file(path: Path | None) -> Path:
    """``path``, else the shipped model; CannotRun when the file does not exist."""
    chosen = path or SHIPPED_MODEL
    if not chosen.is_file():
        hint = "" if path else " (the shipped model is not there yet: pass --model FILE)"
        raise CannotRun(f"model {chosen} does not exist{hint}")
    return chosen


def mean_filter_model() -> Path:
    """A cached 5 x 5 mean-filter ONNX model: the node's work without the CNN's cost."""
    path = CACHE / "mean-filter-5x5.onnx"
    if not path.is_file():
        write_mean_filter_model(path)
    return path


def describe_model(path: Path) -> str:
    """Name, version, file and hash of an ONNX model, for the table's header."""
    session = ort.InferenceSession(str(path), providers=[CPU])
    meta = session.get_modelmeta().custom_metadata_map
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    name = f"{meta.get('name') or path.stem} {meta.get('version', '?')}"
    return f"{name} ({path}, {path.stat().st_size // 1024} KiB, sha256 {digest})"


def provider() -> str:
    """The execution provider the node would pick here: CUDA when onnxruntime offers it."""
    return CUDA if CUDA in ort.get_available_providers() else CPU


# -- processes ---------------------------------------------------------------------------


def storescu(port: int, paths: Sequence[Path], called_ae: str) -> float:
    """Send ``paths`` in one association with DCMTK storescu (TCP_NODELAY=1); the seconds."""
    command = [dcmtk_tool("storescu"), "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, *map(str, paths)], env=DCMTK_ENV, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise CannotRun(f"storescu to {called_ae} failed: {(done.stdout + done.stderr)[-1500:]}")
    return seconds


@contextmanager
def database(backend: str, folder: Path, template: str | None = None) -> Iterator[str]:
    """A throw-away migrated job table (see devtools.databases); CannotRun without one."""
    try:
        with temporary_database(backend, folder, template, prefix="bench") as url:
            yield url
    except DatabaseUnavailable as exc:
        raise CannotRun(str(exc)) from exc


@contextmanager
def node_process(
    folder: Path, db_url: str, roles: str, name: str = "node", **settings: Any
) -> Iterator[NodeProcess]:
    """A started ``denoise-node serve --roles ROLES`` with its state under ``folder``.

    Configured as the tests configure it (a TOML file); killed on exit if still running.
    """
    values: dict[str, Any] = {
        "state_dir": str(folder / "state"),
        "database_url": db_url,
        "port": free_port(),
        "min_slices": 1,
        "poll_seconds": 0.2,
        "heartbeat_seconds": 1.0,
        **settings,
    }
    config = write_config(folder / f"{name}.toml", values)
    node = NodeProcess(
        config, folder / "state", values["port"], db_url, roles, folder / f"{name}.log"
    )
    try:
        yield node.start()
    finally:
        node.close()


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a live process in MiB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def in_child(call: Callable[..., T], *args: Any) -> tuple[T, float | None]:
    """``call(*args)`` in a fresh (spawned) Python process: its result and its peak RSS.

    A process of its own per measurement, because memory freed in Python is seldom given
    back to the system: the peak of a shared process would include what came before.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_with_peak, call, *args).result()


def _with_peak(call: Callable[..., T], *args: Any) -> tuple[T, float | None]:
    result = call(*args)
    return result, peak_rss_mib()


# -- output ------------------------------------------------------------------------------


def progress(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cell(value: object) -> str:
    """A table cell: None is n/a, floats with 3 significant-ish digits."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table on stdout."""
    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def note(text: str) -> None:
    """A bullet under the tables (setup, caveats)."""
    print(f"- {text}")


def machine() -> list[str]:
    """CPU, cores, memory, GPU and software versions of this machine."""
    info = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    meminfo = Path("/proc/meminfo").read_text().split()
    ram_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20
    return [
        f"CPU: {cpu}, {os.cpu_count()} logical cores; RAM {ram_gib:.1f} GiB",
        f"GPU: {gpu()}",
        f"onnxruntime {ort.__version__} (providers: {', '.join(ort.get_available_providers())}); "
        f"Python {platform.python_version()}; Linux {platform.release()}",
    ]


def gpu() -> str:
    """The GPUs nvidia-smi lists, or why there are none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none on this machine (no nvidia-smi): CPU figures only"
    done = subprocess.run(
        [smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip().replace("\n", "; ") or "none found by nvidia-smi"


def load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def parser(
    description: str, full_slices: int = FULL_SLICES, model_help: str | None = None
) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --slices and (with model_help) --model."""
    options = argparse.ArgumentParser(description=description)
    options.add_argument(
        "--quick", action="store_true", help=f"smoke run: {QUICK_SLICES} slices, one repeat"
    )
    options.add_argument(
        "--slices",
        type=int,
        help=f"slices per series (default {full_slices}, {QUICK_SLICES} with --quick)",
    )
    options.set_defaults(full_slices=full_slices)
    if model_help is not None:
        options.add_argument("--model", type=Path, help=model_help)
    return options


def slices(args: argparse.Namespace) -> int:
    """The --slices asked for, else the quick or the full default."""
    return args.slices or (QUICK_SLICES if args.quick else args.full_slices)


def run(
    title: str,
    options: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, print the machine, run ``body``; exit status 1 only if it cannot run."""
    args = options.parse_args(argv)
    print(f"## {title}\n")
    for line in machine():
        note(line)
    before = load()
    note(f"load average (1/5/15 min) at start: {before}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
    try:
        body(args)
    except CannotRun as exc:
        print(f"{title}: cannot run: {exc}", file=sys.stderr)
        return 1
    print()
    note(f"load average (1/5/15 min) at end: {load()}")
    return 0
