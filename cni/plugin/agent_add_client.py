"""The plugin's one-request ADD to a running agent (`cni.contract.agent_add`, protocol version 2).

Every wait is short unless the agent said it holds the pod:
- connect: at most CONNECT_TIMEOUT (a unix socket connects at once or is refused; only a full listen
  backlog makes it wait);
- the first answer: within FIRST_ANSWER_TIMEOUT of the start. For a non-mesh or a sidecar pod it is the
  final one (mode decided, rules applied): a wedged or dead agent costs a non-mesh or sidecar pod at most
  that long, then the plugin's standalone path runs;
- after an "interim" answer (the agent holds the pod: ambient enrolment, eBPF sidecar) up to the
  configured `agent_timeout` in all, and no standalone path any more: the pod fails closed.

Uses the `_socket` extension directly: `socket` pulls in `enum`, `selectors` and friends, milliseconds
of start-up on every ADD.
"""

from __future__ import annotations

import _socket
import time

from cni.contract import agent_add, events
from cni.plugin.unix_connect import connect

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any

CONNECT_TIMEOUT = 0.25
FIRST_ANSWER_TIMEOUT = 2.0


class Unreachable(Exception):
    """The agent was not there, refused, did not answer in time or answered garbage: run standalone
    (``held``: after an interim answer, where the pod must fail closed instead)."""

    def __init__(self, msg: str, held: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.held = held


class _Lines:
    """Reply lines off one connection, in order: an interim line and the final one may arrive in one read."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = b""

    def next(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete line before the deadline")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
            if len(self.buf) > events.MAX_LINE_BYTES and b"\n" not in self.buf[: events.MAX_LINE_BYTES + 1]:
                raise events.LineTooLong(f"line longer than {events.MAX_LINE_BYTES} bytes")
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def _read(lines: _Lines, deadline: float, held: bool) -> agent_add.AddReply:
    try:
        line = lines.next(deadline)
    except events.LineTooLong as exc:
        raise Unreachable("agent reply too long", held) from exc
    except TimeoutError as exc:
        what = "the agent did not finish the ADD in time" if held else "the agent did not answer in time"
        raise Unreachable(what, held) from exc
    except OSError as exc:
        raise Unreachable(f"talking to the agent failed: {exc.strerror or exc}", held) from exc
    if not line.strip():
        raise Unreachable("the agent closed the connection without an answer", held)
    try:
        return agent_add.parse_reply(events.decode_line(line))
    except ValueError as exc:
        raise Unreachable(f"bad agent reply: {exc}", held) from exc


def send_add(socket_path: str, request: dict[str, Any], timeout: float,
             first_timeout: float = FIRST_ANSWER_TIMEOUT) -> agent_add.AddReply:
    """Send the ADD; the agent's final reply (Unreachable when there is none; `held` says whether the
    agent had taken the pod). `timeout`: the whole exchange once the agent holds the pod."""
    started = time.monotonic()
    payload = events.encode_line(request)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        connect(sock, socket_path, Unreachable)
        try:
            sock.sendall(payload)
        except OSError as exc:
            raise Unreachable(f"sending to the agent failed: {exc.strerror or exc}") from exc
        lines = _Lines(sock)
        reply = _read(lines, started + min(first_timeout, timeout), False)
        if reply.kind != "interim":
            return reply
        return _read(lines, started + max(timeout, first_timeout), True)
    finally:
        sock.close()
