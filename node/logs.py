"""Structured logging: one line per event, with the job and series it concerns.

Modules log with ``extra={"job_id": ..., "series_uid": ...}``; the JSON format keeps
those as fields.  Only UIDs identify data: never a patient's name, ID or birth date.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import warnings
from functools import cache
from typing import Any

from pydicom._dicom_dict import DicomDictionary
from pydicom.uid import UID

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


#: A quoted value in a library's message: '...' or "..."
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
#: Libraries that quote received values (a name where a UID belongs) in their messages.
_QUOTING_LIBRARIES = ("pynetdicom", "pydicom")


@cache
def _attribute_names() -> frozenset[str]:
    """Every DICOM attribute's name and keyword: quoting those reveals nothing."""
    entries = DicomDictionary.values()
    return frozenset(name for entry in entries for name in (entry[2], entry[4]) if name)


def _masked(match: re.Match[str]) -> str:
    value = match.group(1) if match.group(1) is not None else match.group(2)
    if value in _attribute_names() or (0 < len(value) <= 64 and UID(value).is_valid):
        return match.group(0)
    return f"'({len(value)} characters)'"


class HeaderValueFilter(logging.Filter):
    """Keeps received header values and library tracebacks out of every log line.

    pynetdicom and pydicom quote the values they find odd ("Non-conformant 'Affected SOP
    Instance UID' value 'PROBE^SECRET'") and log a traceback per malformed PDU.  Their
    quoted values are masked unless a UID or an attribute's name, a traceback becomes
    the exception's class name, and a record that only repeats an exception is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_QUOTING_LIBRARIES):
            return True
        if isinstance(record.msg, BaseException):
            return False  # pynetdicom's LOGGER.exception(exc) after its own error line
        message = _QUOTED.sub(_masked, record.getMessage())
        if record.exc_info and record.exc_info[0] is not None:
            message += f" ({record.exc_info[0].__name__})"
        record.msg, record.args = message, None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _thread_ended(args: threading.ExceptHookArgs) -> None:
    """A library thread that dies logs one line, not a traceback that may quote values."""
    logging.getLogger("node").error(
        "thread %s ended by %s",
        args.thread.name if args.thread is not None else "?",
        args.exc_type.__name__,
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        return text


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send every log line to stderr in ``fmt`` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(HeaderValueFilter())
    threading.excepthook = _thread_ended
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs whole datasets at DEBUG and peer details at INFO: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom quotes the value it finds invalid (a birth date written 1943-11-17, a name
    # where a UID belongs) in a log line and a warning: neither may reach the log.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
