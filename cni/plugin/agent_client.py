"""The plugin side of the plugin-event protocol (cni/contract/events.py): one JSON line each way.

Stdlib only, and no `typing` or `json` at run time (the plugin imports this for every mesh pod). Every
wait is bounded by one overall deadline.
"""

from __future__ import annotations

import socket
import time

from cni.contract import events
from cni.contract.record import Record
from cni.plugin.unix_connect import connect

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from typing import Any


class AgentUnavailable(Exception):
    """The agent could not be reached, did not answer in time, or answered garbage."""

    def __init__(self, msg: str, retryable: bool = True) -> None:
        super().__init__(msg)
        self.retryable = retryable


class AgentReply(Record):
    __slots__ = ("ok", "state", "error", "retry")  # noqa: RUF023 - field order (repr)
    ok: bool
    state: str
    error: str
    retry: bool

    def __init__(self, ok: bool, state: str = "", error: str = "", retry: bool = False) -> None:
        self._init(ok=ok, state=state, error=error, retry=retry)


class PluginEvent(Record):
    __slots__ = ("cmd", "container_id", "netns", "ifname", "namespace", "name", "uid", "ips", "mode",  # noqa: RUF023
                 "removes")
    cmd: str
    container_id: str
    netns: str
    ifname: str
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    mode: str
    removes: tuple[str, str] | None  # a DEL's: (backend, iptables setting) the plugin would remove after

    def __init__(
        self,
        cmd: str,
        container_id: str,
        netns: str,
        ifname: str,
        namespace: str,
        name: str,
        uid: str,
        ips: tuple[str, ...],
        mode: str,
        removes: tuple[str, str] | None = None,
    ) -> None:
        self._init(
            cmd=cmd,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            namespace=namespace,
            name=name,
            uid=uid,
            ips=ips,
            mode=mode,
            removes=removes,
        )

    def to_json(self) -> dict[str, Any]:
        return events.event_request(
            self.cmd,
            self.container_id,
            self.netns,
            self.ifname,
            self.namespace,
            self.name,
            self.uid,
            self.ips,
            self.mode,
            self.removes,
        )


def parse_reply(line: bytes) -> AgentReply:
    try:
        obj = events.decode_line(line)
    except ValueError as exc:
        raise AgentUnavailable(f"agent reply is not JSON: {line[:100]!r}", retryable=True) from exc
    if not isinstance(obj, dict) or not isinstance(obj.get(events.OK), bool):
        raise AgentUnavailable("agent reply has no boolean 'ok'", retryable=True)
    state = obj.get(events.STATE, "")
    error = obj.get(events.ERROR, "")
    retry = obj.get(events.RETRY, False)
    return AgentReply(
        ok=obj[events.OK],
        state=state if isinstance(state, str) else "",
        error=error if isinstance(error, str) else str(error),
        retry=retry is True,
    )


def send_event(socket_path: str, event: PluginEvent, timeout: float) -> AgentReply:
    """Send one event and wait (at most ``timeout`` seconds in all) for the agent's answer."""
    deadline = time.monotonic() + timeout
    payload = events.encode_line(event.to_json())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(max(0.001, min(timeout, 5.0)))
        connect(sock, socket_path, AgentUnavailable, " (is the agent running?)")
        try:
            sock.sendall(payload)
            line = events.read_line(sock, deadline)
        except events.LineTooLong as exc:
            raise AgentUnavailable("agent reply too long") from exc
        except TimeoutError as exc:
            raise AgentUnavailable(f"the agent did not answer within {timeout:g}s") from exc
        except OSError as exc:
            raise AgentUnavailable(f"talking to the agent failed: {exc.strerror or exc}") from exc
        if not line.strip():
            raise AgentUnavailable("the agent closed the connection without an answer")
        return parse_reply(line)
    finally:
        sock.close()
