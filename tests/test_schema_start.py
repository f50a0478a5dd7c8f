"""The embedded default starts by itself; a production database is migrated on purpose."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from alembic import command

from devtools.databases import DatabaseUnavailable, temporary_database
from node import db
from node.config import Settings
from node.context import NodeContext
from node.db import SchemaOutOfDate


def test_a_fresh_sqlite_job_table_is_created_on_first_start_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    with caplog.at_level(logging.INFO, logger="node.db"):
        ctx = NodeContext.open(settings)
    try:
        assert ctx.queries.list_jobs() == []
    finally:
        ctx.close()
    assert any("SQLite job table created at" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="node.db"):
        NodeContext.open(settings).close()
    assert not [r for r in caplog.records if r.name == "node.db"], "a current table is left alone"


@pytest.mark.postgres
def test_an_out_of_date_postgresql_schema_is_refused_with_the_command_to_run(
    tmp_path: Path,
) -> None:
    try:
        with temporary_database("postgresql", tmp_path) as url:
            command.downgrade(db.alembic_config(url), "base")
            with pytest.raises(SchemaOutOfDate, match="run `denoise-node db upgrade`"):
                NodeContext.open(Settings(state_dir=tmp_path / "state", database_url=url))
    except DatabaseUnavailable as exc:
        pytest.fail(str(exc))
