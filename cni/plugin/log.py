"""One JSON object per line, never on stdout (stdout carries the CNI result).

Each line goes first to the agent, as one datagram on the unix socket `cni-log.sock` in the log file's
directory (the agent's state dir on nodes), so the plugin's logs show in the agent's output (`kubectl
logs`). When no agent listens there (or its queue is full) the line is appended to the log file instead,
which is kept bounded: past `MAX_LOG_BYTES` it is renamed to `<file>.1` (the previous `.1` is dropped).

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
#: The agent's datagram socket for plugin log lines, next to the log file.
FORWARD_SOCKET = "cni-log.sock"
#: The fallback file is rotated (one old copy kept) once it grows past this.
MAX_LOG_BYTES = 1 << 20
_MAX_DATAGRAM = 60000


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
        self._sock: Any = None  # _socket.socket once connected; False after a failed attempt

    def bind(self, **context: str) -> None:
        """Add or replace context fields (e.g. once CNI_ARGS has been parsed)."""
        self.context.update(context)

    def configure(self, path: str | None = None, level: str | None = None) -> None:
        if path and path != self.path:
            self.path = path
            self._close_socket()
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
        data = (jsoncodec.dumps(record, default=str, separators=(",", ":")) + "\n").encode("utf-8", "backslashreplace")
        if not self._forward(data):
            self._append(data)

    def _forward(self, data: bytes) -> bool:
        """Send the line to the agent; False when it cannot take it (then the file gets it)."""
        if self._sock is False or len(data) > _MAX_DATAGRAM:
            return False
        import _socket  # the C module: no `socket` (enum, selectors) import cost on the plugin's path

        try:
            if self._sock is None:
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
                self._sock = sock
                sock.connect(os.path.join(os.path.dirname(self.path), FORWARD_SOCKET))
            self._sock.send(data, _socket.MSG_DONTWAIT)
            return True
        except OSError:  # no agent listening, queue full (EAGAIN): the file, for the rest of this run
            self._close_socket()
            self._sock = False
            return False

    def close(self) -> None:
        """Let go of the agent's log socket (a long-lived process running the plugin's code does)."""
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock:
            try:
                self._sock.close()
            except OSError:
                pass
        self._sock = None

    def _append(self, data: bytes) -> None:
        try:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, mode=0o755, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o640)
            try:
                size = os.fstat(fd).st_size
                if size and size + len(data) > MAX_LOG_BYTES:  # rotate: this line starts a new file
                    os.replace(self.path, self.path + ".1")
                    os.close(fd)
                    fd = os.open(self.path, flags, 0o640)
                os.write(fd, data)
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
