"""The worker role: claim a queued job, denoise its series into the spool, hand it to the sender.

Every change to a job goes through the JobManager.  While a job runs, a heartbeat
thread proves the worker is alive; if the claim is lost (the job was cancelled, or a
stall detector gave it to someone else) the worker stops at the next slice.  On
SIGTERM the worker stops at the next slice and releases the job back to ``queued``.
Bad input fails a job for good; anything else is retried until ``max_attempts``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from node.context import NodeContext
from node.denoise import Denoiser
from node.derive import DerivationSpec, derived_series_uid, derived_sop_uid
from node.grain import zoom_warnings
from node.jobs.manager import DerivedFile, LostClaim
from node.jobs.records import JobInputView, JobView
from node.jobs.states import EventKind, JobState
from node.noise import noise_warnings
from node.pipeline import (
    BadInput,
    SeriesResult,
    denoise_series,
    derivation_spec,
    series_grain_zoom,
)
from node.spool import Spool

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Interrupted(Exception):
    """The worker is stopping (SIGTERM): the job goes back to the queue."""


class Worker:
    """Claims and denoises jobs until told to stop; the model is loaded on first use."""

    def __init__(
        self,
        ctx: NodeContext,
        denoiser: Denoiser | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.manager = ctx.manager
        self.queries = ctx.queries
        self.registry = ctx.registry
        self.name = f"{ctx.name}/work"
        self._denoiser = denoiser
        self.stop = stop or threading.Event()
        self._last_beat = 0.0

    @property
    def provider(self) -> str | None:
        return self._denoiser.provider if self._denoiser is not None else None

    def register(self) -> None:
        """Enter the worker registry (the dashboard's and ``status``'s list of workers)."""
        self.registry.register(self.name, "work", socket.gethostname(), os.getpid(), self.provider)
        self._last_beat = time.monotonic()
        log.info("worker %s started", self.name, extra={"worker": self.name})

    def unregister(self) -> None:
        """Leave the registry: the worker stopped on purpose."""
        self.registry.stopped(self.name)
        log.info("worker %s stopped", self.name, extra={"worker": self.name})

    def run_once(self) -> bool:
        """One step, which ``node.service`` polls: requeue jobs of silent workers, beat
        when due, then claim one queued job and process it; False when there was none.

        Once ``stop`` is set, a job in hand is released at the next slice boundary.
        """
        self.manager.requeue_stalled(self.settings.stale_after_seconds)
        if time.monotonic() - self._last_beat >= self.settings.heartbeat_seconds:
            self.registry.heartbeat(self.name, self.provider)
            self._last_beat = time.monotonic()
        job = self.manager.claim_next_job(self.name)
        if job is None:
            return False
        started = time.monotonic()
        try:
            with self._heartbeat(job.id) as lost:
                result = self._denoise(job, lost)
            self._warn_about_noise(job.id, result)
            handed_over = self.manager.finish_denoising(
                job.id,
                self.name,
                result.series_uid,
                self._model.name,
                self._model.version,
                result.summary(),
                result.noise_slices,
            )
        except _Interrupted as exc:
            self._outcome(job, started, logging.INFO, "released", str(exc))
            self._settle(self.manager.release_job, job.id, self.name, f"released: {exc}")
        except LostClaim as exc:
            self._outcome(job, started, logging.WARNING, "abandoned", str(exc))
        except BadInput as exc:
            self._settle(self.manager.fail_job, job.id, self.name, f"bad input: {exc}")
            self._outcome(job, started, logging.ERROR, "failed", f"bad input: {exc}")
        except Exception as exc:  # noqa: BLE001 - any other failure is retried
            error = f"{exc.__class__.__name__}: {exc}"
            retry_in = self.settings.retry_seconds * job.attempts
            state = self._settle(self.manager.fail_job, job.id, self.name, error, retry_in)
            log.debug("job %s failed", job.id, exc_info=True)
            if state is JobState.FAILED:
                self._outcome(job, started, logging.ERROR, "failed", error)
            else:
                outcome = "abandoned" if state is None else f"will retry in {retry_in:.0f} s"
                self._outcome(job, started, logging.WARNING, outcome, error)
        else:
            outcome = "denoised" if handed_over is JobState.SENDING else "denoised, superseded"
            self._outcome(job, started, logging.INFO, outcome, result.summary(), result)
        return True

    @property
    def _model(self) -> Denoiser:
        """The denoiser, loaded on first use; a load failure is retried with the next job."""
        if self._denoiser is None:
            self._denoiser = Denoiser(
                self.settings.model_file, self.settings.providers, self.settings.batch_size
            )
            self.registry.heartbeat(self.name, self._denoiser.provider)
        return self._denoiser

    def _denoise(self, job: JobView, lost: threading.Event) -> SeriesResult:
        """Denoise the job's input set; what an earlier job made from the same input is reused."""
        inputs = self.queries.job_inputs(job.id)
        if not inputs:
            raise BadInput("the job has no input instances")
        model = self._model
        generation = self.queries.series_generation(job.series_instance_uid)
        paths = [self.ctx.spool.path(i.spool_path) for i in inputs]
        zoom = series_grain_zoom(paths, model, self.settings.match_noise_grain)
        spec = derivation_spec(self.settings, model, job.strength, generation, zoom)
        reused = self._reuse(job.id, inputs, spec)
        taken = {file.source_sop_instance_uid for file in reused}
        fresh = [i for i in inputs if i.sop_instance_uid not in taken]
        content = {i.sop_instance_uid: i.sha256 for i in inputs}
        written: list[DerivedFile] = []

        def write(index: int, ds: Dataset) -> None:
            relative = Spool.derived(job.id, index)
            self.ctx.spool.write_atomic(
                relative, lambda handle: ds.save_as(handle, enforce_file_format=True)
            )
            source_uid = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            written.append(
                DerivedFile(ds.SOPInstanceUID, source_uid, content.get(source_uid), relative)
            )

        def progress(done: int, total: int) -> None:
            if lost.is_set():
                raise LostClaim(f"job {job.id} was taken from {self.name} (cancelled or stalled)")
            if self.stop.is_set() and done < total:
                raise _Interrupted(f"worker stopping after {done} of {total} slices")

        if fresh:
            sources = [self.ctx.spool.path(i.spool_path) for i in fresh]
            result = denoise_series(sources, write, model, spec, progress)
        else:
            series_uid = derived_series_uid(job.series_instance_uid, spec)
            result = SeriesResult(
                job.series_instance_uid, series_uid, provider=model.provider, grain_zoom=zoom
            )
        measured = [replace(f, noise=n) for f, n in zip(written, result.noise_slices, strict=True)]
        result.reused = len(reused)
        result.noise_slices = [f.noise for f in reused + measured]
        self.manager.record_derived(job.id, self.name, reused + measured)
        return result

    def _warn_about_noise(self, job_id: int, result: SeriesResult) -> None:
        """A warning event for a weak drop or an input noise the model was not trained on."""
        warnings = noise_warnings(
            result.noise, self.settings.noise_warn_drop, self._model.trained_noise_hu
        ) + zoom_warnings(result.grain_zoom)
        for warning in warnings:
            self.manager.add_event(job_id, self.name, EventKind.WARNING, warning)

    def _reuse(
        self, job_id: int, inputs: list[JobInputView], spec: DerivationSpec
    ) -> list[DerivedFile]:
        """Take over derived instances earlier jobs made from the same input, model and strength.

        Each gets a name of this job's own in the spool (a hard link), so purging the
        earlier job leaves it in place.
        """
        wanted = {derived_sop_uid(i.sop_instance_uid, spec): i for i in inputs}
        found = self.queries.reusable_derived(job_id, {uid: i.sha256 for uid, i in wanted.items()})
        position = {i.sop_instance_uid: n for n, i in enumerate(inputs)}
        files = []
        for uid, derived in found.items():
            if not self.ctx.spool.path(derived.spool_path).is_file():
                continue
            source = wanted[uid]
            relative = Spool.reused(job_id, position[source.sop_instance_uid])
            self.ctx.spool.link(derived.spool_path, relative)
            files.append(
                DerivedFile(
                    uid,
                    source.sop_instance_uid,
                    source.sha256,
                    relative,
                    derived.job_id,
                    derived.noise,
                )
            )
        return files

    @contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[threading.Event]:
        """Heartbeat the job (and this worker) every ``heartbeat_seconds``.

        The yielded event is set when the claim is lost.
        """
        lost = threading.Event()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.settings.heartbeat_seconds):
                try:
                    self.manager.heartbeat(job_id, self.name)
                    self.registry.heartbeat(self.name)
                except LostClaim:
                    lost.set()
                    return
                except SQLAlchemyError as exc:
                    log.warning("heartbeat of job %s skipped: %s", job_id, exc.__class__.__name__)

        thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            done.set()
            thread.join()

    def _settle(self, verb: Callable[..., T], *args: Any) -> T | None:
        """Call a manager verb that ends the attempt; a lost claim there means nothing to do."""
        try:
            return verb(*args)
        except LostClaim as exc:
            log.warning("%s", exc)
            return None

    def _outcome(
        self,
        job: JobView,
        started: float,
        level: int,
        outcome: str,
        detail: str,
        result: SeriesResult | None = None,
    ) -> None:
        """One log line per job outcome, with its duration; ERROR only for a final failure."""
        seconds = round(time.monotonic() - started, 2)
        log.log(
            level,
            "job %s %s in %.1f s: %s",
            job.id,
            outcome,
            seconds,
            detail,
            extra={
                "job_id": job.id,
                "series_uid": job.series_instance_uid,
                "outcome": outcome,
                "slices": result.slices if result else None,
                "seconds": seconds,
                "provider": self.provider,
                "attempt": job.attempts,
            },
        )
