"""The one-request ADD (protocol version 2 of the plugin socket): the plugin hands a whole CNI ADD to a
running agent, which decides the pod's mode from its own pod cache and, for a sidecar pod, applies the
redirect in-process, then answers with what it did.

Framing, field names of the pod object and the reply's `ok`/`error`/`retry` are the ones of
`cni.contract.events` (one JSON object per line, one request per connection). Version 1 requests
(ADD/DEL/CHECK with a mode the plugin decided, STATUS) keep working unchanged on the same socket.

Request (plugin -> agent):
    {"v": 2, "cmd": "ADD", "container_id": str, "netns": str, "ifname": str,
     "pod": {"namespace": str, "name": str, "uid": str},
     "ips": [str],                       # prevResult addresses, as the runtime gave them (CIDR)
     "rules": {"backend": "iptables"|"nftables"|"ebpf", "iptables": "auto"|"legacy"|"nft"},
     "exclude_namespaces": [str]}        # the plugin's own list: the agent decides with it

Replies (agent -> plugin), one line each; an "interim" line may come first:
    {"v": 2, "ok": true, "mode": "none", "reason": str}                       done, nothing to do
    {"v": 2, "ok": true, "mode": "sidecar", "state": "enrolled", "backend": str}  rules in, by the agent
    {"v": 2, "ok": true, "mode": "ambient"|"sidecar", "interim": true}        the agent holds the pod
        and the final line follows (ambient enrolment, eBPF sidecar): the plugin waits its full timeout
    {"v": 2, "ok": true, "mode": "ambient", "state": "enrolled"}              final line of an ambient pod
    {"v": 2, "ok": false, "standalone": true, "error": str}                   the agent will not do this
        ADD (pod unknown to it, other backend...): the plugin runs its standalone path
    {"v": 2, "ok": false, "mode": str, "error": str, "retry": bool, "code": int}  the ADD failed; `code`
        (optional) is the CNI error code to report (e.g. 101 for a bad annotation)

An agent that speaks only version 1 refuses the request with an error starting with
`UNSUPPORTED_VERSION_PREFIX`; the plugin then runs its standalone path (`old_agent`).

Pure and stdlib only (the plugin imports it on every ADD that reaches a running agent): no `typing`,
`json` or `re` at run time.
"""

from __future__ import annotations

from cni.contract import events

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

VERSION = 2
UNSUPPORTED_VERSION_PREFIX = "unsupported protocol version"  # what a version-1 agent answers

# rule backends the plugin can ask for, and iptables flavour settings
BACKENDS = ("iptables", "nftables", "ebpf")
IPTABLES_SETTINGS = ("auto", "legacy", "nft")
MODES = ("none", "sidecar", "ambient")

# request fields (beside those of cni.contract.events)
RULES = "rules"
RULES_BACKEND = "backend"
RULES_IPTABLES = "iptables"
EXCLUDE_NAMESPACES = "exclude_namespaces"

# reply fields (beside ok / error / retry / state)
MODE = "mode"
REASON = "reason"
INTERIM = "interim"
STANDALONE = "standalone"
BACKEND = "backend"
CODE = "code"


def add_request(
    container_id: str,
    netns: str,
    ifname: str,
    namespace: str,
    name: str,
    uid: str,
    ips: Sequence[str],
    backend: str,
    iptables: str,
    exclude_namespaces: Sequence[str],
) -> dict[str, Any]:
    return {
        events.VERSION: VERSION,
        events.CMD: events.ADD,
        events.CONTAINER_ID: container_id,
        events.NETNS: netns,
        events.IFNAME: ifname,
        events.POD: {events.POD_NAMESPACE: namespace, events.POD_NAME: name, events.POD_UID: uid},
        events.IPS: list(ips),
        RULES: {RULES_BACKEND: backend, RULES_IPTABLES: iptables},
        EXCLUDE_NAMESPACES: list(exclude_namespaces),
    }


# ---- replies (built by the agent) --------------------------------------------------------------------


def none_reply(reason: str) -> dict[str, Any]:
    return {events.VERSION: VERSION, events.OK: True, MODE: "none", REASON: reason}


def done_reply(mode: str, state: str, backend: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {events.VERSION: VERSION, events.OK: True, MODE: mode, events.STATE: state}
    if backend:
        out[BACKEND] = backend
    return out


def interim_reply(mode: str) -> dict[str, Any]:
    return {events.VERSION: VERSION, events.OK: True, MODE: mode, INTERIM: True}


def standalone_reply(reason: str) -> dict[str, Any]:
    return {events.VERSION: VERSION, events.OK: False, STANDALONE: True, events.ERROR: reason}


def failed_reply(mode: str, error: str, retry: bool, code: int = 0, state: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {events.VERSION: VERSION, events.OK: False, MODE: mode, events.ERROR: error,
                           events.RETRY: retry}
    if code:
        out[CODE] = code
    if state:
        out[events.STATE] = state
    return out


# ---- replies (read by the plugin) --------------------------------------------------------------------


class AddReply:
    """One reply line as the plugin reads it. kind: "done", "interim", "standalone", "failed"."""

    __slots__ = ("backend", "code", "error", "kind", "mode", "reason", "retry", "state")

    def __init__(self, kind: str, mode: str = "", state: str = "", reason: str = "", error: str = "",
                 retry: bool = False, code: int = 0, backend: str = "") -> None:
        self.kind = kind
        self.mode = mode
        self.state = state
        self.reason = reason
        self.error = error
        self.retry = retry
        self.code = code
        self.backend = backend

    def __repr__(self) -> str:
        return (f"AddReply(kind={self.kind!r}, mode={self.mode!r}, state={self.state!r}, error={self.error!r}, "
                f"retry={self.retry!r}, code={self.code!r}, backend={self.backend!r})")


class ReplyError(ValueError):
    """The line is not a valid reply to a version 2 request."""


def _str(obj: dict[str, Any], key: str, limit: int = 4096) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ReplyError(f"reply field {key!r} is not a string")
    return value[:limit]


def old_agent(obj: dict[str, Any]) -> bool:
    """A version-1 agent's refusal of a version-2 request."""
    error = obj.get(events.ERROR)
    return obj.get(events.OK) is False and isinstance(error, str) and error.startswith(UNSUPPORTED_VERSION_PREFIX)


def parse_reply(obj: Any) -> AddReply:
    """A decoded reply line -> AddReply (ReplyError when it is none). An old agent's refusal of the
    version reads as "standalone"."""
    if not isinstance(obj, dict) or not isinstance(obj.get(events.OK), bool):
        raise ReplyError("reply has no boolean 'ok'")
    if old_agent(obj):
        return AddReply("standalone", error=_str(obj, events.ERROR))
    if obj.get(events.VERSION) != VERSION or isinstance(obj.get(events.VERSION), bool):
        raise ReplyError(f"reply has version {str(obj.get(events.VERSION))[:20]!r}, expected {VERSION}")
    mode = _str(obj, MODE)
    if mode and mode not in MODES:
        raise ReplyError(f"reply has unknown mode {mode[:40]!r}")
    if obj[events.OK]:
        if not mode:
            raise ReplyError("reply has no mode")
        if obj.get(INTERIM) is True:
            if mode == "none":
                raise ReplyError("an interim reply must name a mode the agent holds")
            return AddReply("interim", mode=mode)
        return AddReply("done", mode=mode, state=_str(obj, events.STATE), reason=_str(obj, REASON),
                        backend=_str(obj, BACKEND, 40))
    if obj.get(STANDALONE) is True:
        return AddReply("standalone", error=_str(obj, events.ERROR))
    code = obj.get(CODE, 0)
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code < 1000:
        raise ReplyError("reply field 'code' is not a CNI error code")
    return AddReply("failed", mode=mode, state=_str(obj, events.STATE), error=_str(obj, events.ERROR),
                    retry=obj.get(events.RETRY) is True, code=code)
