"""Denoise one series: the single code path of the worker and of ``denoise-node denoise``.

Three stages overlap so the model is never idle: a reader thread reads, validates and
decodes slices; the calling thread runs the model on batches; a writer thread blends,
converts back to stored values, builds the derived instance and hands it to ``write``.
Bounded queues keep memory flat; the first error in any stage stops all three and is
raised in the caller, so a callback that raises (say, to stop at a slice boundary)
ends the series cleanly.  An Enhanced CT instance gives one slice per frame.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from node.config import Settings
from node.denoise import Denoiser
from node.derive import DerivationSpec, derive_instance, derived_series_uid, frame_view
from node.grain import SAMPLE_SLICES, grain_zoom, sample_indices, series_grain
from node.noise import NoiseFigure, measure_slice, pixel_size_mm, slice_comment, summarise_series
from node.pixels import PixelCodec, blend, model_input

log = logging.getLogger(__name__)

_DONE = object()
_POLL = 0.1


class BadInput(Exception):
    """A slice cannot be denoised as it is; retrying will not help.  Names the SOP UID only."""


@dataclass
class SeriesResult:
    """What one series gave: the derived UIDs, and seconds spent per stage."""

    source_series_uid: str = ""
    series_uid: str = ""
    slices: int = 0
    #: (derived SOP Instance UID, source SOP Instance UID), in the order of the sources.
    instances: list[tuple[str, str]] = field(default_factory=list)
    read_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    wall_seconds: float = 0.0
    provider: str = ""
    #: derived instances taken over from an earlier job instead of denoised again
    reused: int = 0
    #: each derived slice's noise figure (a reused one's as its job measured it), None where
    #: the slice has no flat soft tissue
    noise_slices: list[NoiseFigure | None] = field(default_factory=list)
    #: the slices went through the model resampled by this factor (node.grain)
    grain_zoom: float = 1.0

    @property
    def noise(self) -> NoiseFigure | None:
        """The series' noise figure: medians over its measurable slices, None if none is."""
        return summarise_series(self.noise_slices)

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.slices} slices in {self.wall_seconds:.1f} s "
            f"(read {self.read_seconds:.1f} s, infer {self.infer_seconds:.1f} s, "
            f"write {self.write_seconds:.1f} s) on {self.provider}"
            + (f"; {self.reused} reused from earlier jobs" if self.reused else "")
            + (
                f"; resampled x{self.grain_zoom:.2f} to the model's noise grain"
                if self.grain_zoom != 1.0
                else ""
            )
            + (f"; {self.noise.comment()}" if self.noise else "")
        )


@dataclass
class _Slice:
    index: int
    #: the single-frame source, or frame_view() of a frame of a multi-frame one
    source: Dataset
    frame: int | None
    stored: np.ndarray
    codec: PixelCodec
    keep: np.ndarray
    hu: np.ndarray


class _Stages:
    """Queues between the stages and the first error, which stops every stage."""

    def __init__(self, depth: int) -> None:
        self.read: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.write: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.failed = threading.Event()
        self.errors: list[BaseException] = []

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.failed.set()

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while not self.failed.is_set():
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue
        raise _Stopped

    def get(self, q: queue.Queue[Any]) -> Any:
        while not self.failed.is_set():
            try:
                return q.get(timeout=_POLL)
            except queue.Empty:
                continue
        raise _Stopped

    def thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self.fail(exc)

        worker = threading.Thread(target=run, name=name, daemon=True)
        worker.start()
        return worker


class _Stopped(Exception):
    """Another stage failed; this one stops quietly."""


def denoise_series(
    sources: list[Path],
    write: Callable[[int, Dataset], None],
    denoiser: Denoiser,
    spec: DerivationSpec,
    progress: Callable[[int, int], None] | None = None,
) -> SeriesResult:
    """Denoise the slices ``sources`` (one series) and ``write(index, dataset)`` each result.

    Raises BadInput for a slice that cannot be denoised, and whatever ``write`` or
    ``progress`` raise (after the slices before it were written).
    """
    if not sources:
        raise BadInput("the series has no instances")
    started = time.perf_counter()
    result = SeriesResult(provider=denoiser.provider, grain_zoom=spec.grain_zoom)
    run = _SeriesRun(sources, write, spec, progress, result)
    stages = run.stages = _Stages(depth=2 * denoiser.batch_size)
    reader = stages.thread(run.read, "pipeline-read")
    writer = stages.thread(run.write_all, "pipeline-write")
    try:
        for items in _batches(stages, denoiser.batch_size):
            t0 = time.perf_counter()
            batch = np.stack([model_input(i.hu, i.keep) for i in items])
            denoised = denoiser.denoise(batch, spec.grain_zoom)
            run.result.infer_seconds += time.perf_counter() - t0
            stages.put(stages.write, (items, denoised))
        stages.put(stages.write, _DONE)
    except _Stopped:
        pass
    except BaseException as exc:
        stages.fail(exc)
    finally:
        writer.join()
        reader.join()
    if stages.errors:
        raise stages.errors[0]
    run.result.wall_seconds = time.perf_counter() - started
    return run.result


@dataclass
class _SeriesRun:
    """The reading and the writing stage of one ``denoise_series`` call, and its result."""

    sources: list[Path]
    write: Callable[[int, Dataset], None]
    spec: DerivationSpec
    progress: Callable[[int, int], None] | None
    result: SeriesResult
    stages: _Stages = field(init=False)
    now: datetime = field(default_factory=datetime.now)
    #: slices expected; grows as multi-frame instances turn out to hold more than one
    expected: int = field(init=False)

    def __post_init__(self) -> None:
        self.expected = len(self.sources)

    def read(self) -> None:
        shape: tuple[int, ...] | None = None
        index = 0
        for number, path in enumerate(self.sources, start=1):
            t0 = time.perf_counter()
            items = _read_instance(number, path, index)
            self.expected += len(items) - 1
            for item in items:
                if shape is None:
                    shape = item.stored.shape
                    self.result.source_series_uid = item.source.SeriesInstanceUID
                    self.result.series_uid = derived_series_uid(
                        self.result.source_series_uid, self.spec
                    )
                _check_same_series(item, shape, self.result.source_series_uid)
            self.result.read_seconds += time.perf_counter() - t0
            for item in items:
                self.stages.put(self.stages.read, item)
            index += len(items)
        self.stages.put(self.stages.read, _DONE)

    def write_all(self) -> None:
        result, spec = self.result, self.spec
        while (batch := self.stages.get(self.stages.write)) is not _DONE:
            items, denoised = batch
            for item, out in zip(items, denoised, strict=True):
                t0 = time.perf_counter()
                mixed = blend(item.hu, out, spec.strength)
                stored = item.codec.to_stored(mixed, item.stored, item.keep)
                noise = _measure(item, mixed)
                result.noise_slices.append(noise)
                derived = derive_instance(
                    item.source, stored, spec, self.now, item.frame, slice_comment(noise)
                )
                self.write(item.index, derived)
                result.instances.append((derived.SOPInstanceUID, item.source.SOPInstanceUID))
                result.slices += 1
                result.write_seconds += time.perf_counter() - t0
                if self.progress is not None:
                    self.progress(result.slices, self.expected)


def _measure(item: _Slice, output_hu: np.ndarray) -> NoiseFigure | None:
    """The slice's noise before and after: the source HU and the blended output HU."""
    pixel_mm = pixel_size_mm(item.source.get("PixelSpacing"))
    return measure_slice(item.hu, output_hu, item.keep, pixel_mm)


def _batches(stages: _Stages, size: int) -> Iterator[list[_Slice]]:
    batch: list[_Slice] = []
    while (item := stages.get(stages.read)) is not _DONE:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_instance(number: int, path: Path, first_index: int) -> list[_Slice]:
    """Read, validate and decode one instance: one slice, or one per frame of Enhanced CT.

    BadInput names what is wrong and the SOP Instance UID, never the patient.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise BadInput(
            f"instance {number} ({Path(path).name}) is not readable DICOM: {exc}"
        ) from exc
    uid = str(ds.get("SOPInstanceUID", "")) or f"number {number} (no SOP Instance UID)"
    sop_class = ds.get("SOPClassUID")
    if sop_class not in (CTImageStorage, EnhancedCTImageStorage) or ds.get("Modality") != "CT":
        raise BadInput(
            f"instance {uid} is {sop_class or 'no SOP class'!s} with modality "
            f"{ds.get('Modality', 'none')}, not a CT image"
        )
    for keyword in ("Rows", "Columns", "PixelData", "SeriesInstanceUID"):
        if not ds.get(keyword):
            raise BadInput(f"instance {uid} has no {keyword}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise BadInput(f"instance {uid} has {ds.SamplesPerPixel} samples per pixel, CT has 1")
    frames = int(ds.get("NumberOfFrames") or 1)
    multi_frame = sop_class == EnhancedCTImageStorage
    if frames > 1 and not multi_frame:
        raise BadInput(f"instance {uid} is CT Image Storage with {frames} frames")
    rows, columns = int(ds.Rows), int(ds.Columns)
    try:
        views = [frame_view(ds, f) for f in range(1, frames + 1)] if multi_frame else [ds]
        codecs = [PixelCodec.from_dataset(view) for view in views]
        decoded = ds.pixel_array
    except Exception as exc:  # decoders and malformed headers raise many types
        raise BadInput(f"instance {uid}: pixel data cannot be decoded: {exc}") from exc
    if decoded.size != frames * rows * columns or decoded.shape[-2:] != (rows, columns):
        raise BadInput(
            f"instance {uid}: pixel data of shape {decoded.shape} does not match "
            f"{frames} frame(s) of {rows} x {columns}"
        )
    pixels = decoded.reshape(frames, rows, columns)
    slices = []
    for offset, (view, codec, stored) in enumerate(zip(views, codecs, pixels, strict=True)):
        keep = codec.untouchable(stored)
        frame = offset + 1 if multi_frame else None
        slices.append(
            _Slice(first_index + offset, view, frame, stored, codec, keep, codec.to_hu(stored))
        )
    return slices


def _check_same_series(item: _Slice, shape: tuple[int, ...], series_uid: str) -> None:
    uid = item.source.SOPInstanceUID
    if item.source.SeriesInstanceUID != series_uid:
        raise BadInput(f"instance {uid} belongs to another series than the first slice")
    if item.stored.shape != shape:
        raise BadInput(
            f"instance {uid} is {item.stored.shape[0]} x {item.stored.shape[1]}, the series' "
            f"first slice is {shape[0]} x {shape[1]}: all slices of a series must match"
        )


def series_grain_zoom(sources: list[Path], denoiser: Denoiser, matching: bool = True) -> float:
    """The factor a series' slices are resampled by before ``denoiser`` (``node.grain``),
    measured on SAMPLE_SLICES of its slices, spread over its instances (and over the frames
    of an Enhanced CT one); 1 for a model without a noise grain, or where ``matching`` is
    off."""
    if denoiser.noise_grain is None or not matching or not sources:
        return 1.0
    numbers = sample_indices(len(sources))
    per_instance = -(-SAMPLE_SLICES // len(numbers))
    slices = []
    for number in numbers:
        items = _read_instance(number + 1, sources[number], 0)
        for i in sample_indices(len(items))[:per_instance]:
            slices.append((model_input(items[i].hu, items[i].keep), items[i].keep))
    return grain_zoom(series_grain(slices), denoiser.noise_grain)


def derivation_spec(
    settings: Settings,
    denoiser: Denoiser,
    strength: float,
    source_generation: str = "",
    grain_zoom: float = 1.0,
) -> DerivationSpec:
    """How this node labels a series derived with ``denoiser`` at ``strength`` (from the
    reception ``source_generation`` of its source series, when known, with its slices
    resampled by ``grain_zoom``)."""
    return DerivationSpec(
        model_name=denoiser.name,
        model_version=denoiser.version,
        strength=strength,
        series_number_offset=settings.series_number_offset,
        description_suffix=settings.series_description_suffix,
        node_ae_title=settings.ae_title,
        source_generation=source_generation,
        grain_zoom=grain_zoom,
    )


def denoise_folder(in_dir: Path, out_dir: Path, settings: Settings) -> list[SeriesResult]:
    """Denoise every CT series in ``in_dir`` into ``out_dir`` (``denoise-node denoise``).

    One series is written as ``out_dir/0001.dcm``...; several go to one sub-folder each,
    ``out_dir/<derived series UID>/0001.dcm``...  Files that are not CT images (a
    DICOMDIR, a dose report, a README) are skipped with a log line.
    """
    series = _group_by_series(in_dir)
    if not series:
        raise BadInput(f"{in_dir} holds no CT image files")
    denoiser = Denoiser(settings.model_file, settings.providers, settings.batch_size)
    results = []
    for sources in series.values():
        zoom = series_grain_zoom(sources, denoiser, settings.match_noise_grain)
        spec = derivation_spec(settings, denoiser, settings.strength, grain_zoom=zoom)
        target = out_dir
        if len(series) > 1:
            first = pydicom.dcmread(sources[0], stop_before_pixels=True)
            target = out_dir / derived_series_uid(first.SeriesInstanceUID, spec)
        target.mkdir(parents=True, exist_ok=True)

        def write(index: int, ds: Dataset, folder: Path = target) -> None:
            ds.save_as(folder / f"{index + 1:04d}.dcm", enforce_file_format=True)

        result = denoise_series(sources, write, denoiser, spec)
        log.info(
            "series denoised into %s: %s",
            target,
            result.summary(),
            extra={"series_uid": result.source_series_uid, "slices": result.slices},
        )
        results.append(result)
    return results


def _group_by_series(in_dir: Path) -> dict[str, list[Path]]:
    """CT image files by SeriesInstanceUID, each series once per SOP Instance UID, in file order."""
    series: dict[str, dict[str, Path]] = defaultdict(dict)
    for path in sorted(p for p in Path(in_dir).rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, OSError):
            log.info("skipping %s: not a DICOM file", path.name)
            continue
        if header.get("SOPClassUID") not in (CTImageStorage, EnhancedCTImageStorage):
            log.info("skipping %s: not a CT image", path.name)
            continue
        series[header.SeriesInstanceUID].setdefault(header.SOPInstanceUID, path)
    return {uid: list(files.values()) for uid, files in series.items()}
