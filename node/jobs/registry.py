"""The registry of running node processes: who runs which roles, and their last sign of life."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import utcnow
from node.jobs.records import WorkerView, from_row
from node.jobs.tables import Worker


class WorkerRegistry:
    """Rows in ``workers``: written at start, on every heartbeat and at stop."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def register(
        self, name: str, roles: str, hostname: str, pid: int, provider: str | None = None
    ) -> None:
        now = utcnow()
        with self._sessions.begin() as session:
            session.merge(
                Worker(
                    name=name,
                    roles=roles,
                    hostname=hostname,
                    pid=pid,
                    provider=provider,
                    started_at=now,
                    heartbeat_at=now,
                    stopped_at=None,
                )
            )

    def heartbeat(self, name: str, provider: str | None = None) -> None:
        values: dict[str, Any] = {"heartbeat_at": utcnow()}
        if provider is not None:
            values["provider"] = provider
        with self._sessions.begin() as session:
            session.execute(update(Worker).where(Worker.name == name).values(**values))

    def stopped(self, name: str) -> None:
        with self._sessions.begin() as session:
            session.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow()))

    def workers(self) -> list[WorkerView]:
        with self._sessions() as session:
            rows = session.scalars(select(Worker).order_by(Worker.name))
            return [from_row(WorkerView, row) for row in rows]
