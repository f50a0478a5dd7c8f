"""``denoise-node demo``: the whole chain on one laptop, with Orthanc as the PACS.

It starts a real Orthanc and a real node process (``serve --roles receive,work,send``,
SQLite and CPU, the shipped model), sends a simulated low-dose copy of a real head CT
(or a generated phantom) with DCMTK ``storescu``, waits until Orthanc holds the derived
series and prints what a person wants to know: slices, seconds per stage, the noise drop
the job recorded (flat soft tissue, median over slices), the noise in one uniform region
before and after (with the full-dose figure where there is one), and where to look.
Everything it started is stopped again, also on Ctrl-C.  With ``--keep`` Orthanc loads the
Orthanc Web Viewer plugin, also receives the input series (as a scanner would archive it)
and stays up until Ctrl-C, and the demo prints the viewer's address of both series.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from devtools.node_process import NodeExited, NodeProcess, write_config
from devtools.orthanc import WEB_VIEWER_PLUGIN, OrthancServer
from devtools.tools import DCMTK_ENV, dcmtk_tool, free_port
from node import db
from node.jobs import FINAL_STATES, JobQueries, JobState
from node.jobs.records import JobView
from node.logs import configure_logging
from node.pixels import PixelCodec

NODE_AE = "DENOISE"
DEMO_AE = "DEMO-SCANNER"
ROI = 16


class DemoError(Exception):
    """The demo cannot go on; the message says what to do."""


def register(commands: argparse._SubParsersAction) -> None:
    """Entry point of the ``denoise_node.commands`` group: adds ``denoise-node demo``."""
    demo = commands.add_parser("demo", help="end-to-end demo with Orthanc as the PACS")
    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    configure_logging(args.log_level or "WARNING", args.log_format or "text")
    return run_demo(args)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``denoise-node demo``."""
    parser.add_argument(
        "--series",
        default="head-toshiba-aquilion",
        help="shared CT series to simulate from (default: head-toshiba-aquilion; "
        "a generated phantom where the shared data are absent)",
    )
    parser.add_argument("--dose", type=float, default=0.25, help="simulated dose (default 0.25)")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    parser.add_argument(
        "--settle-seconds",
        type=float,
        default=3.0,
        help="quiet time before a series becomes a job (default 3; the node's default is 10)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="give up after this many seconds"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep Orthanc running until Ctrl-C, with the input and the derived series "
        "in its web viewer (prints both addresses)",
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code (0 when Orthanc holds the derived series)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return Demo(args).run()
    except (DemoError, NodeExited, TimeoutError, FileNotFoundError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


@dataclass
class Stages:
    """Seconds per stage of the chain, as the summary prints them."""

    simulate: float = 0.0
    send: float = 0.0
    settle: float = 0.0
    denoise: float = 0.0
    send_back: float = 0.0

    def line(self) -> str:
        parts = [
            f"{name.replace('_', ' ')} {getattr(self, name):.1f} s"
            for name in ("simulate", "send", "settle", "denoise", "send_back")
        ]
        return " · ".join(parts)


class Demo:
    """One run of the demo; ``run`` owns every process and folder it makes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.stages = Stages()
        self.sent_at = db.utcnow()
        #: what the worker said of the resampling to the model's noise grain, if any
        self.resampling = ""

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def run(self) -> int:
        with contextlib.ExitStack() as stack:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="denoise-demo-")))
            node_port = free_port()
            self.say("starting Orthanc (the PACS)")
            orthanc = stack.enter_context(
                OrthancServer(
                    work / "orthanc",
                    node=(NODE_AE, "127.0.0.1", node_port),
                    plugins=viewer_plugins(self.args.keep),
                )
            )
            self.say(f"starting the node on port {node_port} (SQLite, CPU)")
            node = stack.enter_context(self._node(work, node_port, orthanc))
            queries = node.queries

            inputs, reference, label = self._make_input(work / "input")
            job = self._send_and_wait(inputs, queries, node)
            derived = orthanc.series_instances(job.output_series_uid or "")
            if len(derived) != job.denoised_count:
                raise DemoError(
                    f"Orthanc holds {len(derived)} of {job.denoised_count} derived instances"
                )
            self._read_stages(queries, job)
            noise = measure_noise(inputs, reference, orthanc, derived)
            self._summary(label, len(inputs), job, noise, derived, orthanc)
            if self.args.keep:
                node.close()
                self._keep(orthanc, inputs, job)
            return 0

    # -- steps ---------------------------------------------------------------------------

    def _node(self, work: Path, port: int, orthanc: OrthancServer) -> NodeProcess:
        """The node (receive, work, send) on SQLite in ``work``, Orthanc its destination."""
        state = work / "state"
        values: dict[str, Any] = {
            "ae_title": NODE_AE,
            "bind_address": "127.0.0.1",
            "port": port,
            "state_dir": str(state),
            "settle_seconds": self.args.settle_seconds,
            "providers": ["CPUExecutionProvider"],
            "poll_seconds": 0.5,
            "spool_min_free_mb": 0,
            "destinations": {
                "pacs": {
                    "ae_title": orthanc.ae_title,
                    "host": orthanc.host,
                    "port": orthanc.dicom_port,
                }
            },
        }
        if self.args.model is not None:
            values["model_path"] = str(self.args.model.resolve())
        config = write_config(work / "node.toml", values)
        db_url = f"sqlite:///{state / 'node.db'}"
        return NodeProcess(config, state, port, db_url, "receive,work,send", work / "node.log")

    def _make_input(self, folder: Path) -> tuple[list[Path], Path | None, str]:
        """The series to send, the full-dose series it came from (None: phantom), a label."""
        from models.data import SHARED_CT

        source = SHARED_CT / self.args.series
        begin = time.monotonic()
        if source.is_dir():
            from models.simulate import write_low_dose_series

            dose = self.args.dose
            self.say(f"simulating a {dose * 100:g} % dose copy of {source.name} (takes a while)")
            with warnings.catch_warnings():  # skimage's radon warns on every slice
                warnings.simplefilter("ignore", UserWarning)
                paths = write_low_dose_series(source, folder, dose=dose)
            reference: Path | None = source
            label = f"{source.name}, simulated {dose * 100:g} % dose"
        else:
            from devtools.phantom import PhantomSpec, write_phantom_series

            self.say(f"{source} not found: using a generated phantom series")
            paths = write_phantom_series(folder, PhantomSpec(slices=24, size=256, noise_hu=40.0))
            reference = None
            label = "generated phantom (noise 40 HU)"
        self.stages.simulate = time.monotonic() - begin
        self.say(f"input ready: {len(paths)} slices")
        return paths, reference, label

    def _send_and_wait(self, inputs: list[Path], queries: JobQueries, node: NodeProcess) -> JobView:
        series_uid = pydicom.dcmread(inputs[0], stop_before_pixels=True).SeriesInstanceUID
        self.say(f"sending {len(inputs)} slices to the node with DCMTK storescu")
        begin = time.monotonic()
        store(inputs, NODE_AE, node.port)
        self.stages.send = time.monotonic() - begin
        self.sent_at = db.utcnow()
        self.say(f"sent; waiting {self.args.settle_seconds:g} s for the series to settle")

        deadline = time.monotonic() + self.args.timeout
        shown = ""
        while time.monotonic() < deadline:
            node.check_alive()
            jobs = [j for j in queries.list_jobs(limit=20) if j.series_instance_uid == series_uid]
            if jobs:
                job = jobs[0]
                delivered = sum(queries.delivery_counts(job.id).values())
                status = f"job {job.id}: {job.state}"
                if job.state == JobState.RUNNING:
                    status += f" (denoised {job.denoised_count} of {job.instance_count})"
                elif job.state == JobState.SENDING:
                    status += f" (acknowledged {delivered} of {job.denoised_count})"
                if status != shown:
                    self.say(status)
                    shown = status
                if job.state in FINAL_STATES:
                    if job.state != JobState.DONE:
                        raise DemoError(
                            f"job {job.id} ended {job.state}: {job.last_error or job.reason}\n"
                            f"node log:\n{node.log_tail()}"
                        )
                    return job
            time.sleep(0.5)
        raise DemoError(f"no derived series after {self.args.timeout:.0f} s:\n{node.log_tail()}")

    def _keep(self, orthanc: OrthancServer, inputs: list[Path], job: JobView) -> None:
        """Archive the input in Orthanc too, print where to look at both, wait for Ctrl-C."""
        self.say(f"sending the {len(inputs)} input slices to Orthanc too, to compare them")
        store(inputs, orthanc.ae_title, orthanc.dicom_port)
        source_uid = pydicom.dcmread(inputs[0], stop_before_pixels=True).SeriesInstanceUID
        print(viewer_addresses(orthanc, source_uid, job.output_series_uid or ""), flush=True)
        self.say("Orthanc keeps running (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)

    def _read_stages(self, queries: JobQueries, job: JobView) -> None:
        """Seconds per stage from the job's timeline (the node's own clock, UTC)."""
        events = queries.job_events(job.id)
        found = [re.search(r"resampled x[0-9.]+", e.message) for e in events]
        self.resampling = next((f", {m.group(0)} to its noise grain" for m in found if m), "")
        created = events[0].at
        claimed = _last(events, lambda e: e.to_state == JobState.RUNNING)
        denoised = _last(
            events, lambda e: e.from_state == JobState.RUNNING and e.to_state == JobState.SENDING
        )
        done = _last(events, lambda e: e.to_state == JobState.DONE)
        self.stages.settle = max(0.0, (created - self.sent_at).total_seconds())
        if claimed and denoised:
            self.stages.denoise = (denoised - claimed).total_seconds()
        if denoised and done:
            self.stages.send_back = (done - denoised).total_seconds()

    def _summary(
        self,
        label: str,
        slices: int,
        job: JobView,
        noise: Noise,
        derived: list[dict[str, Any]],
        orthanc: OrthancServer,
    ) -> None:
        series = orthanc.get(f"/series/{derived[0]['ParentSeries']}")
        description = series["MainDicomTags"].get("SeriesDescription", "")
        change = 100.0 * (noise.after - noise.before) / noise.before if noise.before else 0.0
        reference = f"; full dose {noise.full_dose:.1f} HU" if noise.full_dose is not None else ""
        print(
            "\nct-denoise-node demo: done\n"
            f"  input     {label}, {slices} slices\n"
            f"  model     {job.model_name} {job.model_version}, strength {job.strength:g}"
            f"{self.resampling}, CPU\n"
            f"  stages    {self.stages.line()}\n"
            f"  noise     {job.noise_report} (as the job records it)\n"
            f"  region    std in a {ROI}x{ROI} region ({noise.where}, mean {noise.mean:.0f} HU):"
            f" input {noise.before:.1f} HU -> denoised {noise.after:.1f} HU ({change:+.0f} %)"
            f"{reference}\n"
            f'  derived   "{description}", {len(derived)} instances in Orthanc\n'
            f"  Orthanc   {orthanc.explorer_url}"
            + ("" if self.args.keep else "  (stopped now; --keep keeps it running)"),
            flush=True,
        )


def store(paths: list[Path], called_ae: str, port: int) -> None:
    """Send ``paths`` to 127.0.0.1:``port`` with DCMTK storescu, as the demo's scanner."""
    result = subprocess.run(
        [dcmtk_tool("storescu"), "-aet", DEMO_AE, "-aec", called_ae, "127.0.0.1", str(port)]
        + [str(path) for path in paths],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(f"storescu failed ({result.returncode}): {result.stderr[-2000:]}")


def viewer_plugins(keep: bool) -> tuple[Path, ...]:
    """The web viewer plugin where the demo keeps Orthanc for a person to look (if installed)."""
    return (WEB_VIEWER_PLUGIN,) if keep and WEB_VIEWER_PLUGIN.is_file() else ()


def viewer_addresses(orthanc: OrthancServer, source_uid: str, derived_uid: str) -> str:
    """Where to look at the input and the derived series: the web viewer, else the explorer."""
    lines = []
    for label, series_uid in (("input", source_uid), ("denoised", derived_uid)):
        found = {record["ParentSeries"] for record in orthanc.series_instances(series_uid)}
        if len(found) != 1:
            raise DemoError(f"Orthanc does not hold the {label} series {series_uid}")
        series_id = found.pop()
        if WEB_VIEWER_PLUGIN in orthanc.plugins:
            address = orthanc.web_viewer_url(series_id)
        else:
            address = f"{orthanc.explorer_url}#series?uuid={series_id}"
        lines.append(f"  {label:<9} {address}")
    if WEB_VIEWER_PLUGIN not in orthanc.plugins:
        lines.append("  (apt-get install orthanc-webviewer for the web viewer)")
    return "\n".join(["\nOpen the series side by side:", *lines])


@dataclass
class Noise:
    """Noise (std HU) in one region of the mid slice: input, output and full dose."""

    before: float
    after: float
    full_dose: float | None
    mean: float
    where: str


def measure_noise(
    inputs: list[Path],
    source: Path | None,
    orthanc: OrthancServer,
    derived: list[dict[str, Any]],
) -> Noise:
    """Noise (std HU) in the same uniform region of the mid slice, before and after.

    The region is chosen on the full-dose slice (the noiseless phantom without shared
    data), not on the noisy input, so the choice does not favour a lucky noise draw:
    the flattest ROI x ROI patch whose mean lies within 0-80 HU (brain, water).
    """
    headers = sorted(
        ((pydicom.dcmread(p, stop_before_pixels=True), p) for p in inputs),
        key=lambda item: _z(item[0]),
    )
    mid_header, mid_path = headers[len(headers) // 2]
    target = _z(mid_header)
    low, keep = _read_hu_keep(mid_path)
    full: np.ndarray | None = None
    if source is not None:
        sources = [p for p in source.iterdir() if p.is_file()]
        nearest = min(
            sources, key=lambda p: abs(_z(pydicom.dcmread(p, stop_before_pixels=True)) - target)
        )
        full, _ = _read_hu_keep(nearest)
        chooser = full
    else:
        from devtools.phantom import phantom_hu

        chooser = phantom_hu(low.shape[0])
    row, col = flattest_patch(chooser, keep)
    region = (slice(row, row + ROI), slice(col, col + ROI))
    match = min(derived, key=lambda d: abs(_orthanc_z(d) - target))
    after, _ = _read_hu_keep(io.BytesIO(orthanc.instance_file(match["ID"])))
    return Noise(
        before=float(low[region].std()),
        after=float(after[region].std()),
        full_dose=float(full[region].std()) if full is not None else None,
        mean=float(low[region].mean()),
        where=f"slice {int(mid_header.get('InstanceNumber', 0) or 0)}, row {row}, col {col}",
    )


def flattest_patch(hu: np.ndarray, keep: np.ndarray, size: int = ROI) -> tuple[int, int]:
    """Top-left corner of a ``size`` x ``size`` patch in the flattest tissue within 0-80 HU.

    Flatness is judged on the patch with a margin of ``size // 2`` around it, so no edge
    lies close enough for a filter's reach to carry it into the measured patch.
    """
    margin = size // 2
    outer = size + 2 * margin
    windows = np.lib.stride_tricks.sliding_window_view(hu, (outer, outer))[::2, ::2]
    excluded = np.lib.stride_tricks.sliding_window_view(keep, (outer, outer))[::2, ::2]
    means = windows.mean(axis=(2, 3))
    stds = windows.std(axis=(2, 3))
    usable = (means >= 0) & (means <= 80) & ~excluded.any(axis=(2, 3))
    if not usable.any():
        raise DemoError("no uniform region within 0-80 HU on the mid slice")
    row, col = np.unravel_index(np.argmin(np.where(usable, stds, np.inf)), stds.shape)
    return int(row) * 2 + margin, int(col) * 2 + margin


def _z(ds: pydicom.Dataset) -> float:
    position = ds.get("ImagePositionPatient")
    return float(position[2]) if position else float(ds.get("InstanceNumber", 0) or 0)


def _orthanc_z(instance: dict[str, Any]) -> float:
    tags = instance["MainDicomTags"]
    position = tags.get("ImagePositionPatient", "")
    if position.count("\\") == 2:
        return float(position.split("\\")[2])
    return float(tags.get("InstanceNumber", 0) or 0)


def _read_hu_keep(source: Path | io.BytesIO) -> tuple[np.ndarray, np.ndarray]:
    """HU and the untouchable (padding / outside the field of view) mask of one file."""
    ds = pydicom.dcmread(source)
    codec = PixelCodec.from_dataset(ds)
    stored = ds.pixel_array
    return codec.to_hu(stored), codec.untouchable(stored)


def _last(events: list[Any], wanted: Callable[[Any], bool]) -> datetime | None:
    found = [event.at for event in events if wanted(event)]
    return found[-1] if found else None
