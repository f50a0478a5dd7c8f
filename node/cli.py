"""``denoise-node``: one command, one sub-command per role or admin action.

Sub-commands of the tooling (``demo``) join through the ``denoise_node.commands``
entry-point group.  Every option can also come from the TOML file (``--config`` or
``DENOISE_NODE_CONFIG``) or a ``DENOISE_NODE_*`` environment variable; see README's
Configuration section.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path

from node import __version__
from node.config import ConfigError, Settings, load_settings
from node.db import SchemaOutOfDate
from node.logs import configure_logging

log = logging.getLogger("node.cli")

#: Entry-point group of sub-commands that live outside the runtime package: each entry is
#: ``register(subparsers)``.  ``devtools`` adds ``demo`` through it, so ``denoise-node demo``
#: works wherever the tooling is installed while the node itself never imports it.
COMMAND_PLUGINS = "denoise_node.commands"


def _settings(args: argparse.Namespace) -> Settings:
    """The settings with the command line's log level and format in them (a receiver
    process, ``node.receiver_processes``, logs as its node does)."""
    loaded = load_settings(args.config)
    settings = loaded.model_copy(
        update={
            "log_level": args.log_level or loaded.log_level,
            "log_format": args.log_format or loaded.log_format,
        }
    )
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: finishing current work and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import parse_roles, run_roles

    settings = _settings(args)
    return run_roles(settings, parse_roles(args.roles), _stop_on_signals())


def _single_role(role: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        args.roles = role
        return cmd_serve(args)

    return command


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from node import db

    settings = _settings(args)
    db.upgrade(settings.db_url, args.revision)
    log.info("database schema upgraded to %s", args.revision)
    return 0


def cmd_denoise(args: argparse.Namespace) -> int:
    from node.denoise import ModelError
    from node.pipeline import BadInput, denoise_folder

    overrides = {"strength": args.strength} if args.strength is not None else {}
    if args.model is not None:
        overrides["model_path"] = args.model
    settings = load_settings(args.config, **overrides)
    configure_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    try:
        results = denoise_folder(args.input, args.output, settings)
    except (BadInput, ModelError) as exc:
        print(f"denoise-node denoise: {exc}", file=sys.stderr)
        return 1
    if not results:
        print(f"denoise-node denoise: no CT images in {args.input}", file=sys.stderr)
        return 1
    for result in results:
        print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denoise-node",
        description="A DICOM node that denoises low-dose CT series and sends them back.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (env DENOISE_NODE_CONFIG); env DENOISE_NODE_* overrides it",
    )
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run several roles in one process (laptop mode)")
    serve.add_argument(
        "--roles",
        default="receive,work,send,web",
        help="comma-separated subset of receive,work,send,web (default: all four)",
    )
    serve.set_defaults(func=cmd_serve)
    for role, text in (
        ("receive", "C-STORE/C-ECHO receiver and series settler"),
        ("work", "denoising worker (scale these out on one PostgreSQL job table)"),
        ("send", "sender of derived series to the destinations"),
    ):
        commands.add_parser(role, help=f"run only the {text}").set_defaults(func=_single_role(role))

    database = commands.add_parser("db", help="job table schema")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply Alembic migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(func=cmd_db_upgrade)

    denoise = commands.add_parser(
        "denoise", help="offline: denoise a folder of DICOM files into a derived series"
    )
    denoise.add_argument("input", type=Path, help="folder with the source series")
    denoise.add_argument("output", type=Path, help="folder for the derived series")
    denoise.add_argument("--strength", type=float, help="0..1, default from config (1.0)")
    denoise.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    denoise.set_defaults(func=cmd_denoise)

    for plugin in entry_points(group=COMMAND_PLUGINS):
        try:
            register = plugin.load()
        except ImportError:  # the tooling is not installed here (the runtime image)
            log.debug("sub-command %s unavailable: %s not importable", plugin.name, plugin.value)
            continue
        register(commands)

    from node.admin import add_admin_commands

    add_admin_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``denoise-node``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (ConfigError, SchemaOutOfDate) as exc:
        print(f"denoise-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
