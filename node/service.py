"""Runs a node process: any subset of the roles receive, work, send and web.

This module alone owns the roles' threads and poll loops: each role (settler, worker,
sender) exposes one step, ``run_once``, that it polls; the receiver's and the web's
servers run their own.  Roles talk to each other only through the job table and the
spool.  SIGTERM sets ``stop``: the receiver stops accepting, the worker
releases its job back to the queue, the sender stops between instances.  A role that
crashes stops the whole process with a non-zero exit so the supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from node.config import ConfigError, Settings
from node.context import NodeContext
from node.housekeeping import Housekeeper
from node.receiver import Receiver
from node.sender import Sender
from node.settler import SeriesSettler
from node.web import serve_web

if TYPE_CHECKING:
    from node.worker import Worker

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


def run_settler(settler: SeriesSettler, stop: threading.Event) -> None:
    """The settling loop of the ``receive`` role: polls ``settler.run_once``."""
    poll = settler.ctx.settings.poll_seconds
    poll_until_stopped(stop, lambda: bool(settler.run_once()), poll, "settle")


def run_worker(worker: Worker, stop: threading.Event) -> None:
    """The ``work`` role's loop: registered while it polls ``worker.run_once``."""
    worker.register()
    try:
        poll_until_stopped(stop, worker.run_once, worker.settings.poll_seconds, "work")
    finally:
        worker.unregister()


def run_sender(sender: Sender, stop: threading.Event) -> None:
    """The ``send`` role's loop: polls ``sender.run_once``."""
    poll_until_stopped(stop, sender.run_once, sender.settings.poll_seconds, "send")


def run_housekeeper(housekeeper: Housekeeper, stop: threading.Event) -> None:
    """Spool retention, in the ``send`` role (else ``receive``): polls ``run_once``."""
    interval = housekeeper.ctx.settings.housekeeping_seconds
    poll_until_stopped(stop, housekeeper.run_once, interval, "housekeeping")


def _role_loops(
    ctx: NodeContext, roles: list[str], stop: threading.Event
) -> dict[str, Callable[[], None]]:
    """One loop per role thread (the web serves instead of polling)."""
    loops: dict[str, Callable[[], None]] = {}
    if "receive" in roles:
        settler = SeriesSettler(ctx)
        loops["settle"] = lambda: run_settler(settler, stop)
    if "work" in roles:
        # Imported here: onnxruntime (which also leaves $TMPDIR/.ses behind) loads only in
        # processes that denoise.
        from node import worker as work_role

        worker = work_role.Worker(ctx, stop=stop)
        loops["work"] = lambda: run_worker(worker, stop)
    if "send" in roles:
        sender = Sender(ctx, stop)
        loops["send"] = lambda: run_sender(sender, stop)
    if "send" in roles or "receive" in roles:
        housekeeper = Housekeeper(ctx)
        loops["housekeeping"] = lambda: run_housekeeper(housekeeper, stop)
    if "web" in roles:
        loops["web"] = lambda: serve_web(ctx, stop)
    return loops


def run_roles(settings: Settings, roles: list[str], stop: threading.Event) -> int:
    """Run ``roles`` until ``stop`` is set; returns the process exit code."""
    ctx = NodeContext.open(settings)
    ctx.registry.register(ctx.name, ",".join(roles), socket.gethostname(), os.getpid())
    receiver = None
    failed: list[str] = []

    def guard(name: str, loop: Callable[[], None]) -> Callable[[], None]:
        def target() -> None:
            try:
                loop()
            except Exception:
                log.exception("role %s crashed; stopping the process", name, extra={"role": name})
                failed.append(name)
                stop.set()

        return target

    threads = [
        threading.Thread(target=guard(name, loop), name=name, daemon=True)
        for name, loop in _role_loops(ctx, roles, stop).items()
    ]
    try:
        if "receive" in roles:
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
