"""Who is asking: passwords, sessions, roles and the cross-site request checks.

On 127.0.0.1 (the default) the dashboard trusts the local user as an admin, like a
local Orthanc Explorer; bound anywhere else it asks for a login from ``web_users``.
Browsers hold a login (cookie; ``node.web.logins`` keeps it in the database) with a
CSRF token that every form carries; scripts may use HTTP Basic.  Every POST must come
from our own origin.  Password checks are throttled (``node.web.throttle``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from fastapi import HTTPException, Request

from node.config import Settings, WebUser
from node.web.throttle import LoginThrottle, ThrottlePolicy, TooManyAttempts

log = logging.getLogger(__name__)

SESSION_COOKIE = "denoise_node_session"
CSRF_COOKIE = "denoise_node_csrf"
FLASH_COOKIE = "denoise_node_flash"
CSRF_HEADER = "X-CSRF-Token"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
#: Scheduling niceness of the password-hash threads (lowest priority is 19).
HASH_THREAD_NICE = 10
Role = Literal["admin", "viewer", "store"]
#: The bearer scheme's throttle key: a wrong token counts against its address.
BEARER_USER = "(bearer token)"


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
    via: Literal["local", "session", "basic", "bearer"]

    @property
    def actor(self) -> str:
        """How the audit log and the job timeline name this person."""
        return f"web:{self.name}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def may_look(self) -> bool:
        """Admins and viewers see the dashboard and the API; a store account does not."""
        return self.role in ("admin", "viewer")

    @property
    def may_store(self) -> bool:
        """Admins and store accounts may post instances (STOW-RS)."""
        return self.role in ("admin", "store")

    def require_look(self) -> None:
        if not self.may_look:
            raise HTTPException(403, f"{self.name} may only store (role {self.role})")

    def require_admin(self) -> None:
        """Viewers may look but not act."""
        if not self.is_admin:
            raise HTTPException(403, f"{self.name} may only look (role {self.role})")


@dataclass
class WebSession:
    """What one request knows of its browser: the login if any, the CSRF token, messages.

    Nothing is stored for anonymous visitors: their CSRF token is a cookie that each form
    repeats (double submit, with the same-origin rule); a login's token is derived from
    its cookie.  ``changed`` names the cookies the response must write.
    """

    csrf: str
    principal: Principal | None = None
    token: str | None = None
    flash: list[tuple[str, str]] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)

    def say(self, level: str, message: str) -> None:
        """A message for the next page shown (a cookie, read once)."""
        self.flash.append((level, message))
        self.changed.add(FLASH_COOKIE)


def login_csrf(token: str) -> str:
    """A login's CSRF token: derived from its cookie, which other sites cannot read."""
    return hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()


def encode_flash(flash: list[tuple[str, str]]) -> str:
    return base64.urlsafe_b64encode(json.dumps(flash[-5:]).encode()).decode("ascii")


def decode_flash(cookie: str | None) -> list[tuple[str, str]]:
    """The messages a cookie carries; anything malformed is none."""
    try:
        items = json.loads(base64.urlsafe_b64decode((cookie or "").encode()) or b"[]")
        return [(str(level), str(text)[:300]) for level, text in items][:5]
    except (ValueError, TypeError, binascii.Error):
        return []


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
        self._hasher = ThreadPoolExecutor(
            throttle.policy.max_hashes, "password-hash", initializer=_yield_cpu
        )

    def authenticate(self, name: str, password: str, address: str) -> Principal | None:
        user_name = name[:64]
        audit = {"audit": True, "user": user_name, "address": address}
        try:
            self.throttle.check(address, user_name)
            with self.throttle.hashing():
                self.throttle.check(address, user_name)  # failures while this one waited
                user = self._users.get(name)
                encoded = user.password_hash if user else None
                checked = self._hasher.submit(verify_password, password, encoded or _dummy_hash())
                ok = checked.result() and encoded is not None
        except TooManyAttempts as refused:
            log.warning("web login refused unchecked: %s", refused, extra=audit)
            raise
        if user is None or not ok:
            self.throttle.failed(address, user_name)
            log.warning("failed web login for %r from %s", user_name, address, extra=audit)
            return None
        self.throttle.succeeded(address, user_name)
        return Principal(user.name, user.role, "session")

    def login_of(self, name: str) -> Principal | None:
        """Who a stored login belongs to, with the role configured now; None if removed."""
        user = self._users.get(name)
        return Principal(user.name, user.role, "session") if user else None

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

    def bearer(self, token: str, address: str) -> Principal | None:
        """``Authorization: Bearer ...``: the account whose ``token_sha256`` matches.

        Every account's digest is compared in constant time; a wrong token counts as a
        failed login of its address (the same throttle, which raises TooManyAttempts).
        """
        audit = {"audit": True, "user": BEARER_USER, "address": address}
        try:
            self.throttle.check(address, BEARER_USER)
        except TooManyAttempts as refused:
            log.warning("bearer token refused unchecked: %s", refused, extra=audit)
            raise
        digest = hashlib.sha256(token.encode()).hexdigest()
        matches = [
            user
            for user in self._users.values()
            if hmac.compare_digest(digest, user.token_sha256 or "")
        ]
        if not matches:
            self.throttle.failed(address, BEARER_USER)
            log.warning("wrong bearer token from %s", address, extra=audit)
            return None
        self.throttle.succeeded(address, BEARER_USER)
        return Principal(matches[0].name, matches[0].role, "bearer")


def _yield_cpu() -> None:
    """Let a hashing thread give way to every other thread of the node.

    A password hash is meant to be slow; a flood of wrong logins must not slow the
    health check, the DICOM listener or a worker in the same process.  Linux applies a
    nice value to one thread when given its thread id; elsewhere nothing changes.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)


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
