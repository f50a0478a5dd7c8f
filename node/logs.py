"""Structured logging: one line per event, with the job and series it concerns.

Modules log with ``extra={"job_id": ..., "series_uid": ...}``; the JSON format keeps
those as fields.  Only UIDs identify data: never a patient's name, ID or birth date.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


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
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs whole datasets at DEBUG and peer details at INFO: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom quotes the value it finds invalid (a birth date written 1943-11-17, a name
    # where a UID belongs) in a log line and a warning: neither may reach the log.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
