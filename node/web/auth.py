"""Who is asking: passwords, sessions, roles and the cross-site request checks.

On 127.0.0.1 (the default) the dashboard trusts the local user as an admin, like a
local Orthanc Explorer; bound anywhere else it asks for a login from ``web_users``.
Browsers hold a server-side session (cookie) with a CSRF token that every form
carries; scripts may use HTTP Basic.  Every POST must come from our own origin.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from node.config import Settings, WebUser
from node.web.throttle import LoginThrottle, ThrottlePolicy, TooManyAttempts

log = logging.getLogger(__name__)

SESSION_COOKIE = "denoise_node_session"
CSRF_HEADER = "X-CSRF-Token"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
Role = Literal["admin", "viewer"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash``: what ``web_users[].password_hash`` holds."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against an scrypt or ``pbkdf2_sha256$iterations$salt$hash`` hash."""
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            n, r, p = (int(v) for v in parts[1:4])
            salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
            actual = hashlib.scrypt(
                password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected), maxmem=2**27
            )
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(parts[1]))
        else:
            return False
    except (ValueError, binascii.Error):
        log.warning("a web_users password_hash is malformed; make it with web hash-password")
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """Checked when the user name is unknown, so a miss takes as long as a wrong password."""
    return hash_password(secrets.token_hex(8))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login_required(settings: Settings) -> bool:
    """Login is needed off the loopback interface, or whenever accounts are configured."""
    return bool(settings.web_users) or not is_loopback(settings.web_host)


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    via: Literal["local", "session", "basic"]

    @property
    def actor(self) -> str:
        """How the audit log and the job timeline name this person."""
        return f"web:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        """Viewers may look but not act."""
        if not self.is_admin:
            raise HTTPException(403, f"{self.name} may only look (role {self.role})")


@dataclass
class WebSession:
    token: str
    csrf: str
    expires: float
    principal: Principal | None = None
    flash: list[tuple[str, str]] = field(default_factory=list)


class Sessions:
    """Server-side sessions in this process: logging out or restarting ends them."""

    def __init__(self, ttl_seconds: float = 12 * 3600, limit: int = 10_000) -> None:
        self.ttl = ttl_seconds
        self.limit = limit
        self._items: dict[str, WebSession] = {}
        self._lock = threading.Lock()

    def get(self, token: str | None) -> WebSession | None:
        with self._lock:
            session = self._items.get(token or "")
            if session is not None and session.expires < time.monotonic():
                del self._items[session.token]
                return None
            return session

    def new(self, principal: Principal | None = None) -> WebSession:
        session = WebSession(
            token=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            expires=time.monotonic() + self.ttl,
            principal=principal,
        )
        with self._lock:
            now = time.monotonic()
            for token in [t for t, s in self._items.items() if s.expires < now]:
                del self._items[token]
            while len(self._items) >= self.limit:
                del self._items[next(iter(self._items))]  # the oldest
            self._items[session.token] = session
        return session

    def drop(self, token: str) -> None:
        with self._lock:
            self._items.pop(token, None)


def throttle_policy(settings: Settings) -> ThrottlePolicy:
    """The ``web_login_*`` settings as the throttle's policy."""
    return ThrottlePolicy(
        delay_seconds=settings.web_login_delay_seconds,
        max_delay_seconds=settings.web_login_max_delay_seconds,
        lock_after=settings.web_login_lock_after,
        lock_seconds=settings.web_login_lock_seconds,
        address_lock_after=settings.web_login_address_lock_after,
        max_hashes=settings.web_login_max_hashes,
        hash_wait_seconds=settings.web_login_hash_wait_seconds,
    )


class Accounts:
    """The configured ``web_users``, checked in constant time per attempt, throttled.

    ``authenticate`` raises TooManyAttempts when the attempt is refused unchecked.
    """

    def __init__(self, users: list[WebUser], throttle: LoginThrottle) -> None:
        self._users = {user.name: user for user in users}
        self.throttle = throttle
        # Hashes run on these few threads only: scrypt's 16 MiB stay in their arenas
        # instead of in one malloc arena per request thread.
        self._hasher = ThreadPoolExecutor(throttle.policy.max_hashes, "password-hash")

    def authenticate(self, name: str, password: str, address: str) -> Principal | None:
        user_name = name[:64]
        audit = {"audit": True, "user": user_name, "address": address}
        try:
            self.throttle.check(address, user_name)
            with self.throttle.hashing():
                self.throttle.check(address, user_name)  # failures while this one waited
                user = self._users.get(name)
                encoded = user.password_hash if user else _dummy_hash()
                ok = self._hasher.submit(verify_password, password, encoded).result()
        except TooManyAttempts as refused:
            log.warning("web login refused unchecked: %s", refused, extra=audit)
            raise
        if user is None or not ok:
            self.throttle.failed(address, user_name)
            log.warning("failed web login for %r from %s", user_name, address, extra=audit)
            return None
        self.throttle.succeeded(address, user_name)
        return Principal(user.name, user.role, "session")

    def basic(self, header: str, address: str) -> Principal | None:
        """``Authorization: Basic ...`` for scripts; None when absent or wrong."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        principal = self.authenticate(name, password, address)
        return Principal(principal.name, principal.role, "basic") if principal else None


def client_address(request: Request) -> str:
    """The peer's address as the socket saw it (no forwarded headers are trusted)."""
    return request.client.host if request.client else "unknown"


def same_origin(request: Request) -> bool:
    """A POST from another site carries its Origin: refuse it (scripts send none)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def check_post(request: Request, session: WebSession | None, token: str | None) -> None:
    """Refuse a POST that is cross-site, or that rides a session without its CSRF token."""
    if not same_origin(request):
        raise HTTPException(403, "cross-origin request refused")
    if session is not None and not hmac.compare_digest(token or "", session.csrf):
        raise HTTPException(403, "missing or stale CSRF token: reload the page and try again")
