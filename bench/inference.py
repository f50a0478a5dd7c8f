"""Inference: the model with onnxruntime alone against the worker's whole path for a series.

``python -m bench.inference [--quick] [--slices N] [--model FILE] [--batch N]``

Alone: ``Denoiser.denoise`` (one onnxruntime ``run`` per batch, the node's session
options) on 512 x 512 HU slices already in memory, at batch sizes 1, 4 and 8, after
one warm-up batch.  The worker's path: ``node.pipeline.denoise_series`` on the DICOM
files of a series, writing each derived instance durably into a temporary spool as the
worker does (read, decode, HU, infer, blend, encode, write + fsync, stages overlapped),
after the same warm-up.  The provider is the one the node picks: CUDA where
onnxruntime offers it, else the CPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from bench import common
from node.config import Settings
from node.denoise import Denoiser
from node.pipeline import SeriesResult, denoise_series, derivation_spec
from node.spool import Spool

BATCHES = (1, 4, 8)
#: Distinct slices held in memory for the bare runs, cycled through.
POOL = 8
TARGET = 0.85


def hu_pool(paths: Sequence[Path]) -> np.ndarray:
    """The first POOL slices of the series as float32 HU [N, H, W]."""
    slices = []
    for path in paths[:POOL]:
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        slices.append(ds.pixel_array.astype(np.float32) * slope + intercept)
    return np.stack(slices)


def bare(model: Path, provider: str, batch: int, paths: Sequence[Path], count: int) -> list[object]:
    """``count`` slices through onnxruntime alone in batches of ``batch``: a table row."""
    pool = hu_pool(paths)
    denoiser = Denoiser(model, [provider], batch)
    starts = [start % len(pool) for start in range(0, count, batch)]  # batch divides POOL
    denoiser.denoise(pool[:batch])
    started = time.perf_counter()
    for start in starts:
        denoiser.denoise(pool[start : start + batch])
    seconds = time.perf_counter() - started
    done = len(starts) * batch
    return ["onnxruntime alone", batch, done, seconds, done / seconds]


def worker_path(model: Path, provider: str, batch: int, paths: Sequence[Path]) -> SeriesResult:
    """The series through denoise_series into a temporary spool, after a warm-up batch."""
    denoiser = Denoiser(model, [provider], batch)
    denoiser.denoise(hu_pool(paths)[:batch])
    defaults = Settings()
    spec = derivation_spec(defaults, denoiser, defaults.strength)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        spool = Spool(Path(folder))

        def write(index: int, ds: Dataset) -> None:
            spool.write_atomic(
                Spool.derived(1, index), lambda out: ds.save_as(out, enforce_file_format=True)
            )

        def report(done: int, total: int) -> None:
            if done % 50 == 0 or done == total:
                common.progress(f"  worker path: {done}/{total} slices")

        return denoise_series(list(paths), write, denoiser, spec, report)


def benchmark(args: argparse.Namespace) -> None:
    model = common.model_file(args.model)
    provider = common.provider()
    count = common.slices(args)
    bare_count = args.bare_slices or (POOL if args.quick else 96)
    paths = common.phantom_series(count)
    common.note(f"model: {common.describe_model(model)}")
    common.note(f"provider: {provider}")

    common.progress(f"worker path: {count} slices, batch {args.batch}")
    result, worker_rss = common.in_child(worker_path, model, provider, args.batch, paths)
    rows = []
    for batch in BATCHES:
        common.progress(f"onnxruntime alone: {bare_count} slices, batch {batch}")
        row, rss = common.in_child(bare, model, provider, batch, paths, bare_count)
        rows.append([*row, rss])
    alone = {int(row[1]): float(row[4]) for row in rows}  # batch -> slices/s
    same = alone.get(args.batch)
    worker = result.slices_per_second
    rows.append(
        ["worker path (denoise_series)", args.batch, result.slices, result.wall_seconds]
        + [worker, worker_rss]
    )
    common.print_table(
        f"Inference on {provider}: {common.SIZE}x{common.SIZE} slices",
        ["path", "batch", "slices", "seconds", "slices/s", "peak RSS MiB"],
        rows,
    )
    stages = [
        ("read + decode + HU (reader thread)", result.read_seconds),
        ("inference (calling thread)", result.infer_seconds),
        ("blend + encode + write + fsync (writer thread)", result.write_seconds),
        ("wall", result.wall_seconds),
    ]
    common.print_table(
        f"Worker path, where the time goes ({result.slices} slices; stages run in three threads, "
        "so busy times overlap)",
        ["stage", "busy s", "share of wall", "slices/s of the stage alone"],
        [
            [name, seconds, seconds / result.wall_seconds, result.slices / seconds]
            for name, seconds in stages
        ],
    )
    common.print_table(
        "Worker path against onnxruntime alone",
        ["comparison", "ratio", "target"],
        [
            [f"worker / alone at batch {args.batch}", worker / same if same else None, TARGET],
            ["worker / best batch alone", worker / max(alone.values()), None],
        ],
    )
    print()
    common.note(
        "each row runs in a fresh Python process; peak RSS is its VmHWM (Python, libraries, "
        "model and session arena, and for the worker path its queues)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = common.parser(
        __doc__.splitlines()[0], model_help="ONNX model (default: the shipped model)"
    )
    options.add_argument(
        "--batch", type=int, default=Settings().batch_size, help="the worker's batch size"
    )
    options.add_argument(
        "--bare-slices",
        type=int,
        help=f"slices per batch size for onnxruntime alone (default 96, {POOL} with --quick)",
    )
    return common.run("Inference benchmark", options, benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
