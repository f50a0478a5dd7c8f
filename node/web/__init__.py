"""The ``web`` role: dashboard, REST API ``/api/v1``, ``/metrics``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import logging
import threading

import uvicorn

from node.context import NodeContext
from node.web.app import create_app

__all__ = ["create_app", "serve_web"]

log = logging.getLogger(__name__)


def serve_web(ctx: NodeContext, stop: threading.Event) -> None:
    """Serve on ``web_host:web_port`` until ``stop`` is set (runs in the role's thread)."""
    settings = ctx.settings
    config = uvicorn.Config(
        create_app(ctx),
        host=settings.web_host,
        port=settings.web_port,
        log_config=None,  # keep the node's logging setup
        access_log=False,  # the pages poll every few seconds; admin actions are logged
        lifespan="off",
        proxy_headers=False,  # the throttle keys on the socket's address, not a header
    )
    server = uvicorn.Server(config)

    def exit_on_stop() -> None:
        stop.wait()
        server.should_exit = True

    threading.Thread(target=exit_on_stop, name="web-stop", daemon=True).start()
    log.info(
        "dashboard on http://%s:%s/",
        settings.web_host,
        settings.web_port,
        extra={"web_host": settings.web_host, "web_port": settings.web_port},
    )
    try:
        server.run()
        started = server.started
    except SystemExit:  # uvicorn exits when it cannot bind: make it a role crash
        started = False
    if not started and not stop.is_set():
        raise RuntimeError(
            f"the web server could not start on {settings.web_host}:{settings.web_port}"
        )
