"""Shared fixtures: a job table on SQLite and on PostgreSQL, free ports.

Every test that touches the database runs twice, once per backend, through the
``db_url`` fixture.  PostgreSQL tests get a fresh database that is dropped after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from devtools.databases import DatabaseUnavailable, temporary_database
from node import db
from node.jobs import JobManager, JobQueries

pytest_plugins = [
    "tests.fixtures.dicom",
    "tests.fixtures.onnx_models",
    "tests.fixtures.orthanc",
    "tests.fixtures.node",
    "tests.fixtures.admin",
    "tests.fixtures.browser",
]

SHARED_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"


ORTHANC_FIXTURES = {"orthanc", "shared_orthanc", "web_viewer_orthanc", "dicomweb_orthanc"}
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what ``make test-fast`` leaves out: Orthanc users, the reliability scenarios
    and the tests of the training code."""
    for item in items:
        if ORTHANC_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.orthanc)
        if HERE / "reliability" in item.path.parents:
            item.add_marker(pytest.mark.slow)
        if HERE / "models" in item.path.parents:
            item.add_marker(pytest.mark.training)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty job table database: SQLite file or a fresh PostgreSQL database."""
    try:
        with temporary_database(request.param, tmp_path) as url:
            yield url
    except DatabaseUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = db.make_engine(db_url)
    yield db.session_factory(engine)
    engine.dispose()


@pytest.fixture
def manager(sessions: sessionmaker[Session]) -> JobManager:
    return JobManager(sessions, max_attempts=3)


@pytest.fixture
def queries(sessions: sessionmaker[Session]) -> JobQueries:
    return JobQueries(sessions)


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """The shared real CT series; skips with a clear message where they are absent."""
    if not SHARED_CT.is_dir():
        pytest.skip(f"shared CT data not found at {SHARED_CT}")
    return SHARED_CT
