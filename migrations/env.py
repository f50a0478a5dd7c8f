"""Alembic environment: runs online against the URL that ``node.db`` puts in the config."""

from alembic import context
from sqlalchemy import create_engine

from node.jobs.tables import Base

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
