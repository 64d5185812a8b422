"""The plugin-event protocol: `headrace-cni` (and `headrace status`) ask the agent over its unix socket.

One JSON object per line, one request per connection, answered by one JSON line (docs/internals.md).

Request: {"v": PROTOCOL_VERSION, "cmd": "ADD"|"DEL"|"CHECK", "container_id", "netns", "ifname",
          "pod": {"namespace", "name", "uid"}, "ips": [str], "mode": "ambient"|"sidecar"}
         a DEL after which the plugin would remove the pod's rules itself also carries
         "removes": {"backend": "iptables"|"nftables", "iptables": <its iptables setting>}: when the agent
         holds the pod on that backend and removes its rules, it answers state "rules-removed" and the
         plugin has nothing left to remove
         or {"v": PROTOCOL_VERSION, "cmd": "STATUS"}
Reply:   {"ok": true, "state": str} (STATUS: {"ok": true, "pods": [...], ...})
         or {"ok": false, "error": str, "retry": bool}

This module holds the version, the command, field and mode names, and the framing: `encode_line` (one
compact JSON object and a newline), `decode_line`, and `read_line` (one line, bounded in size and by a
deadline). The plugin client (cni/plugin/agent_client.py), the agent's server (serve/cni_server.py) and
the status command (serve/status_client.py) all use it. Stdlib only, no `json` import (jsoncodec).
"""

from __future__ import annotations

import time

from cni.contract import jsoncodec, relay

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Protocol

    class Receiver(Protocol):
        """The part of a socket `read_line` uses."""

        def settimeout(self, value: float | None, /) -> None: ...
        def recv(self, bufsize: int, /) -> bytes: ...


PROTOCOL_VERSION = 1
MAX_LINE_BYTES = relay.MAX_LINE_BYTES  # requests (the relayed ADD's too), and the replies to ADD/DEL/CHECK

# commands
ADD = "ADD"
DEL = "DEL"
CHECK = "CHECK"
STATUS = "STATUS"
COMMANDS = (ADD, DEL, CHECK, STATUS)

# pod modes the plugin reports
AMBIENT = "ambient"
SIDECAR = "sidecar"
MODES = (AMBIENT, SIDECAR)

# request fields
VERSION = "v"
CMD = "cmd"
CONTAINER_ID = "container_id"
NETNS = "netns"
IFNAME = "ifname"
POD = "pod"
POD_NAMESPACE = "namespace"
POD_NAME = "name"
POD_UID = "uid"
IPS = "ips"
MODE = "mode"
REMOVES = "removes"  # a DEL's: what the plugin would remove itself afterwards
REMOVES_BACKEND = "backend"
REMOVES_IPTABLES = "iptables"
REMOVING_BACKENDS = ("iptables", "nftables")
RULES_REMOVED = "rules-removed"  # a DEL's state: the agent removed the rules `removes` names

# reply fields
OK = "ok"
STATE = "state"
ERROR = "error"
RETRY = "retry"
PODS = "pods"


def event_request(
    cmd: str,
    container_id: str,
    netns: str,
    ifname: str,
    namespace: str,
    name: str,
    uid: str,
    ips: Sequence[str],
    mode: str,
    removes: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """An ADD/DEL/CHECK request of the plugin; `removes`: (backend, iptables setting) of the rules a DEL's
    plugin would remove itself afterwards."""
    out = {
        VERSION: PROTOCOL_VERSION,
        CMD: cmd,
        CONTAINER_ID: container_id,
        NETNS: netns,
        IFNAME: ifname,
        POD: {POD_NAMESPACE: namespace, POD_NAME: name, POD_UID: uid},
        IPS: list(ips),
        MODE: mode,
    }
    if removes is not None:
        out[REMOVES] = {REMOVES_BACKEND: removes[0], REMOVES_IPTABLES: removes[1]}
    return out


def status_request() -> dict[str, Any]:
    """The STATUS request of `headrace status`."""
    return {VERSION: PROTOCOL_VERSION, CMD: STATUS}


def success_reply(state: str) -> dict[str, Any]:
    return {OK: True, STATE: state}


def failure_reply(error: str, retry: bool, state: str | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {OK: False, ERROR: error, RETRY: retry}
    if state is not None:
        reply[STATE] = state
    return reply


def encode_line(obj: dict[str, Any]) -> bytes:
    """One message: compact JSON and a newline."""
    return (jsoncodec.dumps(obj, separators=(",", ":")) + "\n").encode()


def decode_line(line: bytes) -> Any:
    """The JSON value of one line (UTF-8); ValueError (UnicodeDecodeError, JSONDecodeError, or nested too
    deep for the parser) if it is none."""
    try:
        return jsoncodec.loads(line.decode("utf-8"))
    except RecursionError as exc:
        raise ValueError("JSON nested too deep") from exc


class LineTooLong(ValueError):
    """More than the allowed bytes arrived without a newline."""


def read_line(sock: Receiver, deadline: float, limit: int = MAX_LINE_BYTES) -> bytes:
    """Read up to the first newline and return the line without it (what arrived if the peer closed
    first; b"" if nothing did). `deadline` is a `time.monotonic()` value: TimeoutError once it passed.
    LineTooLong when the line is longer than `limit` bytes. OSError from the socket passes through."""
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete line before the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit and b"\n" not in buf[: limit + 1]:
            raise LineTooLong(f"line longer than {limit} bytes")
    return buf.split(b"\n", 1)[0]
