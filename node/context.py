"""What every role of a node process shares: settings, the job table and the spool."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sqlalchemy import Engine

from node import db
from node.config import Settings
from node.jobs import JobManager, JobQueries, WorkerRegistry
from node.spool import Spool


@dataclass
class NodeContext:
    settings: Settings
    engine: Engine
    manager: JobManager
    queries: JobQueries
    registry: WorkerRegistry
    spool: Spool
    name: str

    @classmethod
    def open(cls, settings: Settings) -> NodeContext:
        """Connect to the job table (SQLite: made current; others: refused when out of
        date) and open the spool."""
        engine = db.make_engine(settings.db_url)
        try:
            db.prepare_schema(engine)
        except Exception:
            engine.dispose()
            raise
        sessions = db.session_factory(engine)
        return cls(
            settings=settings,
            engine=engine,
            manager=JobManager(sessions, settings.max_attempts),
            queries=JobQueries(sessions),
            registry=WorkerRegistry(sessions),
            spool=Spool(settings.spool, settings.spool_min_free_mb),
            name=f"{socket.gethostname()}:{os.getpid()}",
        )

    def close(self) -> None:
        self.engine.dispose()
