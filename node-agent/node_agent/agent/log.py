"""Structured logs of the agent: one JSON object per line on stderr.

Every record carries ts, level, logger and msg, plus the context fields the agent passes in `extra`
(pod, namespace, uid, netns, step, error, ...).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

NOISY = ("pyroute2", "urllib3", "kubernetes", "grpc", "asyncio")
_STD = set(vars(logging.LogRecord("x", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in NOISY:  # third-party chatter stays out of the agent's debug log
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
