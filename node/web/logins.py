"""Dashboard logins kept in the job-table database, so restarts log nobody out.

Only a successful login makes a row; anonymous visitors make none, so no flood can
evict anyone.  The row holds the SHA-256 of the cookie's token, never the token: a
copy of the database opens no session.  The user's role is read from ``web_users``
on every request, so removing an account ends its logins.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import Engine, delete, select

from node import db
from node.jobs.tables import WebLogin


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LoginStore:
    """Create, find and revoke logins; expired ones are deleted as new ones are made."""

    def __init__(self, engine: Engine, lifetime_seconds: float) -> None:
        self._sessions = db.session_factory(engine)
        self.lifetime = timedelta(seconds=lifetime_seconds)

    def create(self, user_name: str) -> str:
        """A new login's token (for the cookie)."""
        token = secrets.token_urlsafe(32)
        now = db.utcnow()
        with self._sessions.begin() as session:
            session.execute(delete(WebLogin).where(WebLogin.expires_at < now))
            session.add(
                WebLogin(
                    token_sha256=_digest(token),
                    user_name=user_name,
                    created_at=now,
                    expires_at=now + self.lifetime,
                )
            )
        return token

    def user_of(self, token: str) -> str | None:
        """The user a live login belongs to; None when unknown, revoked or expired."""
        query = select(WebLogin.user_name).where(
            WebLogin.token_sha256 == _digest(token), WebLogin.expires_at >= db.utcnow()
        )
        with self._sessions() as session:
            return session.execute(query).scalar_one_or_none()

    def revoke(self, token: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(WebLogin).where(WebLogin.token_sha256 == _digest(token)))
