"""The plugin side of the plugin-event protocol (docs/internals.md): one JSON line each way per connection.

Request: {"v": 1, "cmd", "container_id", "netns", "ifname", "pod": {namespace, name, uid}, "ips", "mode"}
Reply:   {"ok": true, "state": ...} or {"ok": false, "error": str, "retry": bool}
Stdlib only. Every wait is bounded by one overall deadline.
"""

import json
import socket
import time
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
MAX_REPLY_BYTES = 65536


class AgentUnavailable(Exception):
    """The agent could not be reached, did not answer in time, or answered garbage."""

    def __init__(self, msg: str, retryable: bool = True) -> None:
        super().__init__(msg)
        self.retryable = retryable


class AgentReply(NamedTuple):
    ok: bool
    state: str = ""
    error: str = ""
    retry: bool = False


class PluginEvent(NamedTuple):
    cmd: str
    container_id: str
    netns: str
    ifname: str
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "cmd": self.cmd,
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "pod": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
            "ips": list(self.ips),
            "mode": self.mode,
        }


def parse_reply(line: bytes) -> AgentReply:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AgentUnavailable(f"agent reply is not JSON: {line[:100]!r}", retryable=True) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise AgentUnavailable("agent reply has no boolean 'ok'", retryable=True)
    state = obj.get("state", "")
    error = obj.get("error", "")
    retry = obj.get("retry", False)
    return AgentReply(
        ok=obj["ok"],
        state=state if isinstance(state, str) else "",
        error=error if isinstance(error, str) else str(error),
        retry=retry is True,
    )


def send_event(socket_path: str, event: PluginEvent, timeout: float) -> AgentReply:
    """Send one event and wait (at most ``timeout`` seconds in all) for the agent's answer."""
    deadline = time.monotonic() + timeout
    payload = (json.dumps(event.to_json(), separators=(",", ":")) + "\n").encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(max(0.001, min(timeout, 5.0)))
        try:
            sock.connect(socket_path)
        except FileNotFoundError as exc:
            raise AgentUnavailable(f"agent socket {socket_path} does not exist (is the agent running?)") from exc
        except ConnectionRefusedError as exc:
            raise AgentUnavailable(f"agent socket {socket_path} refused the connection") from exc
        except TimeoutError as exc:
            raise AgentUnavailable(f"connecting to the agent at {socket_path} timed out") from exc
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the agent at {socket_path}: {exc.strerror}") from exc
        buf = b""
        try:
            sock.sendall(payload)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise AgentUnavailable("agent reply too long")
        except TimeoutError as exc:
            raise AgentUnavailable(f"the agent did not answer within {timeout:g}s") from exc
        except OSError as exc:
            raise AgentUnavailable(f"talking to the agent failed: {exc.strerror or exc}") from exc
        line = buf.split(b"\n", 1)[0]
        if not line.strip():
            raise AgentUnavailable("the agent closed the connection without an answer")
        return parse_reply(line)
    finally:
        sock.close()
