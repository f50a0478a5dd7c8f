"""Frozen copies of job-table rows: what leaves a session instead of an ORM object.

Workers, the sender, the dashboard and the CLI read these; none of them can write a
row by changing an attribute, and none of them can trigger a lazy load after the
session that read the row has closed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

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
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


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


@dataclass(frozen=True)
class DestinationView:
    job_id: int
    destination: str
    state: str
    attempts: int
    failing_since: datetime | None
    reason: str | None
    updated_at: datetime


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
