"""One JSON object per line to the plugin's log file; never to stdout (stdout carries the CNI result).

Logging must never break the plugin: a log file that cannot be written is silently skipped (the error
still reaches the runtime through the CNI error object).
"""

from __future__ import annotations

import os
import time

from cni.contract import jsoncodec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_LOG_FILE = "/var/log/headrace/cni.log"
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _timestamp() -> str:
    now = time.time()
    secs = int(now)
    millis = int((now - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


class JsonLog:
    """A logger bound to one plugin invocation: the pod/netns/container/cmd fields repeat on every line."""

    def __init__(self, path: str = DEFAULT_LOG_FILE, level: str = "info", **context: str) -> None:
        self.path = path
        self.threshold = LEVELS.get(level, LEVELS["info"])
        self.context: dict[str, str] = {
            "pod": "",
            "namespace": "",
            "netns": "",
            "container_id": "",
            "cmd": "",
        }
        self.context.update(context)

    def bind(self, **context: str) -> None:
        """Add or replace context fields (e.g. once CNI_ARGS has been parsed)."""
        self.context.update(context)

    def configure(self, path: str | None = None, level: str | None = None) -> None:
        if path:
            self.path = path
        if level:
            self.threshold = LEVELS.get(level, self.threshold)

    def log(self, level: str, step: str, msg: str, **extra: Any) -> None:
        if LEVELS.get(level, 20) < self.threshold:
            return
        record: dict[str, Any] = {"ts": _timestamp(), "level": level, "msg": msg, "step": step}
        record.update(self.context)
        for key, value in extra.items():
            if key not in record:
                record[key] = value
        line = jsoncodec.dumps(record, default=str, separators=(",", ":")) + "\n"
        try:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        except OSError:
            pass

    def debug(self, step: str, msg: str, **extra: Any) -> None:
        self.log("debug", step, msg, **extra)

    def info(self, step: str, msg: str, **extra: Any) -> None:
        self.log("info", step, msg, **extra)

    def warning(self, step: str, msg: str, **extra: Any) -> None:
        self.log("warning", step, msg, **extra)

    def error(self, step: str, msg: str, **extra: Any) -> None:
        self.log("error", step, msg, **extra)
