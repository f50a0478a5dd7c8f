"""Alembic migrations of the job table; run them with ``denoise-node db upgrade``."""
