"""Runs a node process: any subset of the roles receive, work, send and web.

Each role runs in its own thread and talks to the others only through the job table
and the spool.  SIGTERM sets ``stop``: the receiver stops accepting, the worker
releases its job back to the queue, the sender stops between instances.  A role that
crashes stops the whole process with a non-zero exit so the supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from node.config import ConfigError, Settings
from node.context import NodeContext

log = logging.getLogger(__name__)

ROLES = ("receive", "work", "send", "web")


def parse_roles(text: str) -> list[str]:
    """``"receive,send"`` → ``["receive", "send"]``; unknown roles are a clear error."""
    roles = [role.strip() for role in text.split(",") if role.strip()]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ConfigError(f"unknown role(s) {unknown or text!r}; choose from {', '.join(ROLES)}")
    return list(dict.fromkeys(roles))


def poll_until_stopped(
    stop: threading.Event, step: Callable[[], bool], poll_seconds: float, role: str
) -> None:
    """Run ``step`` until ``stop``, pausing after a step that found nothing to do.

    A job table outage is logged and waited out, never fatal: the role resumes by itself
    when the database returns.
    """
    while not stop.is_set():
        try:
            busy = step()
        except SQLAlchemyError as exc:
            log.warning(
                "%s: job table unreachable, retrying: %s",
                role,
                exc.__class__.__name__,
                extra={"role": role},
            )
            busy = False
        if not busy:
            stop.wait(poll_seconds)


def _role_loops(ctx: NodeContext, roles: list[str]) -> dict[str, Callable[[threading.Event], None]]:
    loops: dict[str, Callable[[threading.Event], None]] = {}
    if "receive" in roles:
        from node.settler import SeriesSettler

        loops["settle"] = SeriesSettler(ctx).run
    if "work" in roles:
        from node.worker import Worker

        loops["work"] = Worker(ctx).run
    if "send" in roles:
        from node.sender import Sender

        loops["send"] = Sender(ctx).run
    if "web" in roles:
        from node.web import serve_web

        loops["web"] = lambda stop: serve_web(ctx, stop)
    return loops


def run_roles(settings: Settings, roles: list[str], stop: threading.Event) -> int:
    """Run ``roles`` until ``stop`` is set; returns the process exit code."""
    ctx = NodeContext.open(settings)
    ctx.registry.register(ctx.name, ",".join(roles), socket.gethostname(), os.getpid())
    receiver = None
    failed: list[str] = []

    def guard(name: str, loop: Callable[[threading.Event], None]) -> Callable[[], None]:
        def target() -> None:
            try:
                loop(stop)
            except Exception:
                log.exception("role %s crashed; stopping the process", name, extra={"role": name})
                failed.append(name)
                stop.set()

        return target

    threads = [
        threading.Thread(target=guard(name, loop), name=name, daemon=True)
        for name, loop in _role_loops(ctx, roles).items()
    ]
    try:
        if "receive" in roles:
            from node.receiver import Receiver

            receiver = Receiver(ctx)
            receiver.start()
        for thread in threads:
            thread.start()
        log.info(
            "node %s running roles %s",
            ctx.name,
            ",".join(roles),
            extra={"roles": ",".join(roles), "database": ctx.engine.url.get_backend_name()},
        )
        while not stop.wait(settings.heartbeat_seconds):
            try:
                ctx.registry.heartbeat(ctx.name)
            except SQLAlchemyError as exc:
                log.warning("job table unreachable, heartbeat skipped: %s", exc.__class__.__name__)
    finally:
        stop.set()
        if receiver is not None:
            receiver.stop()
        for thread in threads:
            thread.join(timeout=60)
        ctx.registry.stopped(ctx.name)
        ctx.close()
        log.info("node %s stopped", ctx.name)
    return 1 if failed else 0
