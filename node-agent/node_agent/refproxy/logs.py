"""Structured logs of the reference proxy: one JSON object a line on stderr (stdout is for results)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("headrace.refproxy")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out["event"] = record.getMessage()
            out.update(fields)
        else:
            msg = record.getMessage()
            try:
                parsed = json.loads(msg)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                out.update(parsed)
            else:
                out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def event(level: int, name: str, **fields: Any) -> None:
    log.log(level, name, extra={"fields": fields})
