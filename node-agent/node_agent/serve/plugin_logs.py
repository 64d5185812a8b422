"""The plugin's log lines, received on a datagram socket and re-logged by the agent (so `kubectl logs`
of the agent shows them, as `"logger": "headrace.cni"`).

headrace-cni sends each JSON log line as one datagram to `cni-log.sock` next to its log file
(`cni.plugin.log`); on nodes that is `<state-dir>/cni-log.sock`. This is a separate socket from the
plugin-event socket: a log line never waits on, or gets in the way of, an ADD. The socket is mode 0600;
lines that are not JSON objects are dropped, fields are kept only when their names are plain
identifiers, and beyond `max_per_second` lines are dropped (counted in the next line that gets through).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from cni.plugin.log import FORWARD_SOCKET
from node_agent.kernel.unix_socket import private_bind_path, remove_stale_socket, unlink_if_ours, wake_blocked

log = logging.getLogger("headrace.cni")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_RESERVED = set(vars(logging.LogRecord("x", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def socket_path(state_dir: Path) -> Path:
    return state_dir / FORWARD_SOCKET


def relog(data: bytes, dropped: int = 0) -> bool:
    """Log one plugin line through the agent's logger; False when it is not a JSON object."""
    try:
        rec = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(rec, dict):
        return False
    level = LEVELS.get(str(rec.pop("level", "info")), logging.INFO)
    msg = str(rec.pop("msg", ""))
    extra: dict[str, object] = {"source": "headrace-cni"}
    if "ts" in rec:
        extra["plugin_ts"] = rec.pop("ts")
    for key, value in rec.items():
        if isinstance(key, str) and key.isidentifier() and key not in _RESERVED and not key.startswith("_"):
            extra[key] = value if isinstance(value, str | int | float | bool | type(None)) else json.dumps(value)
    if dropped:
        extra["dropped_before"] = dropped
    log.log(level, msg, extra=extra)
    return True


class PluginLogListener:
    def __init__(self, path: Path, max_per_second: int = 200) -> None:
        self.path = path
        self.max_per_second = max_per_second
        self.received = 0
        self.dropped = 0
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inode = 0

    def start(self) -> None:
        """Listen; a socket that cannot be made is logged and the plugin keeps writing its file."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            remove_stale_socket(str(self.path), OSError)
            with private_bind_path(str(self.path), OSError) as tmp:  # 0600 from the first moment
                sock.bind(tmp)
            self._inode = os.lstat(self.path).st_ino
        except OSError as exc:
            sock.close()
            logging.getLogger("headrace.agent").warning(
                "plugin log socket unavailable; the plugin logs to its file", extra={
                    "step": "plugin-logs", "socket": str(self.path), "error": str(exc)})
            return
        self._sock = sock  # blocking receive: `stop` shuts it down to wake it
        self._thread = threading.Thread(target=self._run, name="plugin-logs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._sock is not None
        window, in_window, pending_drops = int(time.monotonic()), 0, 0
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data and self._stop.is_set():
                return
            now = int(time.monotonic())
            if now != window:
                window, in_window = now, 0
            in_window += 1
            if in_window > self.max_per_second:
                self.dropped += 1
                pending_drops += 1
                continue
            if relog(data, pending_drops):
                self.received += 1
                pending_drops = 0
            else:
                self.dropped += 1

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            wake_blocked(self._sock)
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()
        unlink_if_ours(str(self.path), self._inode)
