"""Shared fixtures: a job table on SQLite and on PostgreSQL, free ports.

Every test that touches the database runs twice, once per backend, through the
``db_url`` fixture.  PostgreSQL tests get a fresh database that is dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from node import db
from node.jobs import JobManager
from node.tools import free_port  # noqa: F401 - re-exported for tests

pytest_plugins = [
    "tests.fixtures.dicom",
    "tests.fixtures.onnx_models",
    "tests.fixtures.orthanc",
    "tests.fixtures.node",
    "tests.fixtures.admin",
]

POSTGRES_URL = os.environ.get(
    "DENOISE_NODE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty job table database: SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'node.db'}"
        db.upgrade(url)
        yield url
        return
    admin_url = make_url(POSTGRES_URL)
    name = f"denoise_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - report why PostgreSQL is unusable
        admin.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not usable: {exc}")
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    try:
        db.upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def manager(db_url: str) -> Iterator[JobManager]:
    engine = db.make_engine(db_url)
    yield JobManager(db.session_factory(engine), max_attempts=3)
    engine.dispose()


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """The shared real CT series; skips with a clear message where they are absent."""
    if not SHARED_CT.is_dir():
        pytest.skip(f"shared CT data not found at {SHARED_CT}")
    return SHARED_CT
