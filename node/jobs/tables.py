"""Tables of the job table database.  Every change here needs an Alembic migration."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from node.jobs.states import EventKind

UID = String(64)


class Base(DeclarativeBase):
    pass


class Series(Base):
    """A series as received: settles into a job when no instance arrived for a while."""

    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    settled_through: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: this reception's mark in the derived UIDs (``DerivationSpec.source_generation``),
    #: set when the row is made; NULL for a series first received before migration 0010,
    #: whose derived UIDs carry none and must stay as they were
    generation: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Instance(Base):
    """One received SOP instance, durable in the spool under a generated name."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    spool_path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    header: Mapped[dict[str, Any]] = mapped_column(JSON)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Job(Base):
    """One unit of work: denoise a settled series and send the result."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    #: higher first, then oldest: workers and senders take jobs in this order
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rule: Mapped[str] = mapped_column(String(64))
    strength: Mapped[float] = mapped_column(Float)
    destinations: Mapped[list[str]] = mapped_column(JSON)
    instance_count: Mapped[int] = mapped_column(Integer)
    denoised_count: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    run_after: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    output_series_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    #: the series' noise in flat soft tissue (HU, median over measurable slices)
    noise_before_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    noise_after_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: measurable slices behind the figure; 0: none measurable; NULL: not measured
    noise_slices: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


Index("ix_jobs_state_id", Job.state, Job.id)


class JobEvent(Base):
    """One row per transition or notable happening: the job's timeline."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    kind: Mapped[EventKind] = mapped_column(
        Enum(
            EventKind,
            name="job_event_kind",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda kinds: [kind.value for kind in kinds],
        )
    )
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)


class JobInstance(Base):
    """A job's input: the instances of its series as they were when the series settled."""

    __tablename__ = "job_instances"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(255))


class DerivedInstance(Base):
    """A denoised instance written by a worker, waiting in the spool to be sent."""

    __tablename__ = "derived_instances"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    source_sop_instance_uid: Mapped[str] = mapped_column(UID)
    #: the source's content when it was denoised: a later job reuses the file only for this
    source_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spool_path: Mapped[str] = mapped_column(String(255))
    #: the slice's noise figure (HU); NULL where it has no flat soft tissue
    noise_before_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    noise_after_hu: Mapped[float | None] = mapped_column(Float, nullable=True)


class Delivery(Base):
    """A derived instance acknowledged by one destination; what is missing is sent again."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    status: Mapped[int] = mapped_column(Integer)
    sent_at: Mapped[datetime] = mapped_column(DateTime)


class JobDestination(Base):
    """Where a job stands with one destination: pending, acknowledged, committed or failed."""

    __tablename__ = "job_destinations"
    __table_args__ = (UniqueConstraint("job_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    #: refusals (permanent failures) since the destination was last set pending
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: start of the current run of transient failures; the give-up time counts from here
    failing_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    #: Transaction UID of the storage commitment request in force (NULL: none made)
    commitment_uid: Mapped[str | None] = mapped_column(UID, nullable=True, unique=True, index=True)
    #: the first request of this round: the commitment timeout counts from here
    commitment_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    commitment_sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    #: rounds of resending the instances the PACS reported as not committed (one allowed)
    commitment_resends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


#: The key of the one ``housekeeping_runs`` row.
LAST_HOUSEKEEPING = "last"


class HousekeepingRun(Base):
    """What the spool's housekeeping last did: one row, overwritten by every run."""

    __tablename__ = "housekeeping_runs"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    actor: Mapped[str] = mapped_column(String(128))
    jobs: Mapped[int] = mapped_column(Integer)
    files: Mapped[int] = mapped_column(Integer)
    orphan_files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)


class Worker(Base):
    """A running process of the node, with its role and last sign of life."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    roles: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str | None] = mapped_column(String(64), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WebLogin(Base):
    """A dashboard login (``node.web.logins``): only the token's SHA-256 is stored."""

    __tablename__ = "web_logins"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)
