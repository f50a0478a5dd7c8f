"""Before/after PNGs of a job's middle slice, rendered on the server and cached on disk.

Soft-tissue (W400/L40) and lung (W1500/L-600) windows show the source and the
denoised slice side by side; the difference image (denoised - source, W200/L0) shows
what the model removed: noise should look like noise, never like anatomy.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.pixels.processing import apply_rescale

from node.config import Settings
from node.context import NodeContext

Kind = Literal["soft", "lung", "diff"]
WINDOWS: dict[str, tuple[float, float]] = {
    "soft": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "diff": (200.0, 0.0),
}
GAP_PIXELS = 4


class PreviewUnavailable(LookupError):
    """The job has no derived slice (yet), or its files left the spool."""


def preview_dir(settings: Settings, job_id: int) -> Path:
    return settings.state_dir / "previews" / str(int(job_id))


def drop_previews(settings: Settings, job_id: int) -> None:
    """Forget a job's rendered previews: they show patient images, so they go with a purge."""
    shutil.rmtree(preview_dir(settings, job_id), ignore_errors=True)


def middle_pair(ctx: NodeContext, job_id: int) -> tuple[Path, Path]:
    """The source and derived files of the job's middle slice, in patient order."""
    job = ctx.queries.get_job(job_id)
    derived = ctx.queries.derived_instances(job_id)
    sources = {i.sop_instance_uid: i for i in ctx.queries.series_instances(job.series_instance_uid)}
    pairs = [
        (sources[d.source_sop_instance_uid], d)
        for d in derived
        if d.source_sop_instance_uid in sources
    ]
    if not pairs:
        raise PreviewUnavailable(f"job {job_id} has no derived slice to preview")

    def position(pair: tuple[Any, Any]) -> tuple[float, int, int]:
        header = pair[0].header or {}
        return (
            float(header.get("ImagePositionPatientZ") or 0.0),
            int(header.get("InstanceNumber") or 0),
            pair[1].id,
        )

    source, result = sorted(pairs, key=position)[len(pairs) // 2]
    paths = ctx.spool.path(source.spool_path), ctx.spool.path(result.spool_path)
    if not all(path.is_file() for path in paths):
        raise PreviewUnavailable(f"job {job_id}: the slice's files are no longer in the spool")
    return paths


def _hounsfield(path: Path, frame: int = 0) -> tuple[np.ndarray, int]:
    """HU of one frame, and the ReferencedFrameNumber a derived slice names (1 if none)."""
    ds = dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 3:
        pixels = pixels[min(frame, pixels.shape[0] - 1)]
    references = ds.get("SourceImageSequence") or []
    referenced = int(references[0].get("ReferencedFrameNumber") or 1) if references else 1
    return apply_rescale(pixels, ds).astype(np.float32), referenced


def _window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    low = level - width / 2
    return (np.clip((hu - low) / width, 0.0, 1.0) * 255).round().astype(np.uint8)


def render(before: np.ndarray, after: np.ndarray, kind: Kind) -> bytes:
    """The PNG of one preview: before | after in a window, or the difference."""
    width, level = WINDOWS[kind]
    if kind == "diff":
        image = _window(after - before, width, level)
    else:
        gap = np.zeros((before.shape[0], GAP_PIXELS), np.uint8)
        image = np.hstack([_window(before, width, level), gap, _window(after, width, level)])
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def preview_png(ctx: NodeContext, job_id: int, kind: Kind) -> Path:
    """The cached PNG for ``kind``, rendered when missing or when the slice changed."""
    source, derived = middle_pair(ctx, job_id)
    stamp = "|".join(f"{p}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in (source, derived))
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    folder = preview_dir(ctx.settings, job_id)
    cached = folder / f"{kind}-{key}.png"
    if cached.is_file():
        return cached
    after, frame_number = _hounsfield(derived)
    before, _ = _hounsfield(source, frame_number - 1)
    if before.shape != after.shape:
        raise PreviewUnavailable(f"job {job_id}: source and derived slices differ in size")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{kind}-*.png"):
        if stale != cached:
            stale.unlink(missing_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    partial.write_bytes(render(before, after, kind))
    os.replace(partial, cached)
    return cached
