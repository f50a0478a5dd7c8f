"""Database engine, sessions and the schema version check.

SQLite is the embedded default (WAL, a busy timeout so several processes share it);
PostgreSQL is the production database.  SQLite syncs with ``synchronous=NORMAL``: a
commit survives a crash of the process, and the last commits before a power loss, which
it may lose, are the receiver's to rebuild from the fsynced spool at start
(``node.recovery``); the other roles' lost commits are work done again.

The schema is owned by Alembic: an embedded SQLite job table is created or upgraded on
first start, while the node refuses to start against an out-of-date PostgreSQL schema
(an administrator migrates a shared production database on purpose, with
``denoise-node db upgrade``).
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

import migrations

log = logging.getLogger(__name__)


class SchemaOutOfDate(Exception):
    """The database is not at the schema this version of the node needs."""


def utcnow() -> datetime:
    """Naive UTC: one convention that SQLite and PostgreSQL store alike."""
    return datetime.now(UTC).replace(tzinfo=None)


def _ensure_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets the pragmas that make it durable and shareable."""
    _ensure_sqlite_folder(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock at BEGIN so two writers never deadlock on upgrade.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


class DriverStatement:
    """A Core statement compiled once for an engine's dialect and run on the DBAPI cursor
    of the caller's connection, in its transaction.

    For the statements of the hot path (two per received instance): SQLAlchemy's work per
    execution (cache key, parameter and result processing) took 0.15-0.25 ms of a 0.6-0.8 ms
    row on PostgreSQL.  Parameters still go through the column types' own bind processors,
    so values are stored exactly as the ORM stores them (SQLite's datetime text, JSON).
    """

    def __init__(self, statement: ClauseElement, engine: Engine, keys: Sequence[str]) -> None:
        dialect = engine.dialect
        self._compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=keys))
        self.sql = self._compiled.string
        self._order = self._compiled.positiontup if self._compiled.positional else None
        self._processors = {
            name: processor
            for name, bind in self._compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def execute(self, connection: Connection, values: dict[str, Any]) -> Any:
        """Run with ``values``; its first row (RETURNING), or None when it returns none."""
        bound = self._compiled.construct_params(values)
        for name, processor in self._processors.items():
            bound[name] = processor(bound[name])
        parameters = [bound[name] for name in self._order] if self._order else bound
        cursor = connection.connection.cursor()
        try:
            cursor.execute(self.sql, parameters)
            return cursor.fetchone() if cursor.description is not None else None
        finally:
            cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``denoise-node db upgrade``)."""
    _ensure_sqlite_folder(url)
    command.upgrade(alembic_config(url), revision)


def _revisions(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's revision, the newest revision this node knows)."""
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, head


def check_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate with the command to run when the schema is not at head."""
    current, head = _revisions(engine)
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at {current or 'nothing (empty database)'} but this node "
            f"needs {head}: run `denoise-node db upgrade` with the same --config and "
            "DENOISE_NODE_DATABASE_URL"
        )


@contextmanager
def _sqlite_migration_lock(database: str) -> Iterator[None]:
    """One process at a time migrates an SQLite file (roles may start side by side)."""
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_schema(engine: Engine) -> None:
    """Make the job table usable at start: SQLite is created or upgraded here and logged;
    any other database must already be at head (SchemaOutOfDate names the command)."""
    if engine.dialect.name != "sqlite":
        check_schema(engine)
        return
    _ensure_sqlite_folder(str(engine.url))
    with _sqlite_migration_lock(engine.url.database or ""):
        current, head = _revisions(engine)
        if current == head:
            return
        upgrade(engine.url.render_as_string(hide_password=False))
    log.info(
        "SQLite job table %s %s: %s",
        "created at" if current is None else f"upgraded from {current} to",
        head,
        engine.url.database,
        extra={"from_revision": current, "to_revision": head},
    )
