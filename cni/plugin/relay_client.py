"""The launcher's relayed command (`cni.contract.relay`): send the command as it came to the agent's
socket, return what to print. Imports only `_socket` and `time` (both built into the interpreter or
tiny): this runs before any other module of the plugin is loaded, and when the agent answers, nothing
else is.

Waits as the version 2 client's (`cni.plugin.agent_add_client`): connecting at most CONNECT_TIMEOUT, the
first answer within FIRST_ANSWER_TIMEOUT; after a `wait` header as long as the agent said (its copy of
the configuration's `agent_timeout`), and then no standalone path any more: the pod fails closed.
"""

from __future__ import annotations

import _socket
import time

from cni.contract import relay

CONNECT_TIMEOUT = 0.25
FIRST_ANSWER_TIMEOUT = 2.0


class Answer:
    """How the relay went. kind: "done" (print `output`, exit with `status`), "standalone" (the agent
    declined: the plugin's own path; an ADD's without asking it again), "unusable" (no agent, or one that did not
    take the request: the plugin's own path), "held" (the agent took the pod and then gave no answer: the
    ADD fails, `msg` says why)."""

    __slots__ = ("kind", "msg", "output", "status")

    def __init__(self, kind: str, msg: str = "", status: int = 0, output: bytes = b"") -> None:
        self.kind = kind
        self.msg = msg
        self.status = status
        self.output = output


class _Reader:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def header(self, deadline: float) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > relay.MAX_HEADER_BYTES or not self._fill(deadline):
                return self.buf[: relay.MAX_HEADER_BYTES]
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def exactly(self, n: int, deadline: float) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill(deadline):
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def env_of(environ: dict[bytes, bytes]) -> dict[str, str]:
    """The relayed part of the process environment (`posix.environ`: bytes)."""
    out = {}
    for key in relay.ENV_KEYS:
        value = environ.get(key.encode())
        if value is not None:
            out[key] = value.decode("utf-8", "surrogateescape")
    return out


def send(socket_path: str, env: dict[str, str], stdin: bytes) -> Answer | None:
    """The relay's outcome; None when this invocation cannot be relayed as it is (`relay.request_line`)."""
    line = relay.request_line(env, stdin)
    if line is None:
        return None
    started = time.monotonic()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    held = False
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            from cni.plugin.unix_connect import describe

            return Answer("unusable", describe(exc, socket_path))
        sock.sendall(line)
        reader = _Reader(sock)
        deadline = started + FIRST_ANSWER_TIMEOUT
        while True:
            header = relay.parse_header(reader.header(deadline))
            if header is None:
                break
            kind, a, b = header
            if kind == relay.STANDALONE:
                return Answer("standalone", f"the agent left the {env.get('CNI_COMMAND')} to the plugin")
            if kind == relay.WAIT and not held:
                held = True
                deadline = time.monotonic() + a / 1000
                continue
            if kind == relay.DONE:
                output = reader.exactly(b, deadline)
                if output is not None:
                    return Answer("done", status=a, output=output)
            break
        msg = "the agent's answer was cut short or not one of protocol version 3"
    except TimeoutError:
        msg = f"the agent did not finish the {env.get('CNI_COMMAND')} in time" if held else \
            "the agent did not answer in time"
    except OSError as exc:
        msg = f"talking to the agent at {socket_path} failed: {exc.strerror or exc}"
    finally:
        sock.close()
    return Answer("held" if held else "unusable", msg)
