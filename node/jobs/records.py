"""Frozen copies of job-table rows: what leaves a session instead of an ORM object.

Workers, the sender, the dashboard and the CLI read these; none of them can write a
row by changing an attribute, and none of them can trigger a lazy load after the
session that read the row has closed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from node.noise import NoiseFigure

Record = TypeVar("Record")


def from_row(cls: type[Record], row: object) -> Record:
    """Copy the columns that ``cls`` names from an ORM row into a frozen record."""
    return cls(**{field.name: getattr(row, field.name) for field in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class SeriesView:
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    settled_through: datetime | None


@dataclass(frozen=True)
class InstanceView:
    id: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    spool_path: str
    sha256: str
    size_bytes: int
    header: dict[str, Any]
    calling_ae_title: str
    peer_address: str
    received_at: datetime


@dataclass(frozen=True)
class JobView:
    id: int
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    state: str
    priority: int
    rule: str
    strength: float
    destinations: list[str]
    instance_count: int
    denoised_count: int
    attempts: int
    max_attempts: int
    reason: str | None
    last_error: str | None
    claimed_by: str | None
    heartbeat_at: datetime | None
    run_after: datetime | None
    model_name: str | None
    model_version: str | None
    output_series_uid: str | None
    noise_before_hu: float | None
    noise_after_hu: float | None
    noise_slices: int | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def noise(self) -> NoiseFigure | None:
        """The series' noise figure; None when not measured or not measurable."""
        if self.noise_before_hu is None or self.noise_after_hu is None:
            return None
        return NoiseFigure(self.noise_before_hu, self.noise_after_hu, self.noise_slices or 0)

    @property
    def noise_drop(self) -> float | None:
        """The relative drop of the series' noise (0.4: 40 % less), None without a figure."""
        figure = self.noise
        return figure.drop if figure is not None else None

    @property
    def noise_report(self) -> str:
        """The noise figure as ``jobs show`` and the dashboard print it."""
        if self.noise_slices is None:
            return "not measured"
        figure = self.noise
        if figure is None:
            return "not measurable (no flat soft tissue)"
        return (
            f"{figure.before_hu:.1f} -> {figure.after_hu:.1f} HU in flat soft tissue "
            f"({figure.drop:.0%} less, {figure.support} of {self.denoised_count} slices measurable)"
        )


@dataclass(frozen=True)
class EventView:
    id: int
    job_id: int
    at: datetime
    kind: str
    from_state: str | None
    to_state: str | None
    actor: str
    message: str


@dataclass(frozen=True)
class JobInputView:
    """One instance of a job's input set, as it settled."""

    sop_instance_uid: str
    sha256: str
    spool_path: str


@dataclass(frozen=True)
class DerivedView:
    id: int
    job_id: int
    sop_instance_uid: str
    source_sop_instance_uid: str
    source_sha256: str | None
    spool_path: str
    noise_before_hu: float | None
    noise_after_hu: float | None

    @property
    def noise(self) -> NoiseFigure | None:
        """The slice's noise figure, None where it had no flat soft tissue."""
        if self.noise_before_hu is None or self.noise_after_hu is None:
            return None
        return NoiseFigure(self.noise_before_hu, self.noise_after_hu, 1)


@dataclass(frozen=True)
class DestinationView:
    job_id: int
    destination: str
    state: str
    attempts: int
    failing_since: datetime | None
    reason: str | None
    updated_at: datetime
    commitment_uid: str | None
    commitment_requested_at: datetime | None
    commitment_sent_at: datetime | None
    commitment_resends: int


@dataclass(frozen=True)
class WorkerView:
    name: str
    roles: str
    hostname: str
    pid: int
    provider: str | None
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None


@dataclass(frozen=True)
class HousekeepingView:
    """One housekeeping run: jobs purged, files removed (orphans among them), bytes freed."""

    at: datetime
    actor: str
    jobs: int
    files: int
    orphan_files: int
    bytes: int
