"""The plugin-event requests the agent accepts: one line (cni/contract/events.py) -> a validated
`PluginRequest`, or `RequestError` saying what is wrong (answered, never retried).

Every field is checked before anything acts on it: the protocol version and command, the pod uid (the
one rule of `cni.contract.pod_uid`), namespace and name (DNS subdomains), an absolute netns path without
NUL (at most PATH_MAX), the IPs, the mode, a DEL's `removes` (a backend name and an iptables setting).
The netns itself is checked by the server before an ADD is handled (`cni.kernel.netns.open_pod_netns`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from cni.contract import events
from cni.contract.pod_uid import valid_uid
from node_agent.reconcile.state import Outcome

NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
SETTING_RE = re.compile(r"[a-z0-9-]{0,32}")
PATH_MAX = 4096
MAX_IPS = 16


class RequestError(ValueError):
    """The request is malformed; the reply says why (not retryable)."""


@dataclass(frozen=True)
class PluginRequest:
    cmd: str
    uid: str
    namespace: str
    name: str
    netns: str
    ips: tuple[str, ...]
    mode: str
    container_id: str
    removes: tuple[str, str] | None = None  # a DEL's: (backend, iptables setting) the plugin removes after


def _decode(line: bytes) -> dict[str, Any]:
    try:
        obj = events.decode_line(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise RequestError(f"request is not JSON: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise RequestError("request must be a JSON object")
    if obj.get(events.VERSION) != events.PROTOCOL_VERSION or isinstance(obj.get(events.VERSION), bool):
        raise RequestError(
            f"unsupported protocol version {str(obj.get(events.VERSION))[:40]!r} "
            f"(agent speaks {events.PROTOCOL_VERSION})"
        )
    return obj


def parse_ips(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise RequestError("ips must be a list of strings")
    if len(raw) > MAX_IPS:
        raise RequestError(f"too many ips ({len(raw)}, at most {MAX_IPS})")
    ips: list[str] = []
    for ip in raw:
        try:
            ips.append(str(ipaddress.ip_interface(ip).ip))
        except ValueError as exc:
            raise RequestError(f"invalid ip {ip[:60]!r}") from exc
    return tuple(ips)


def parse_request(line: bytes) -> PluginRequest:
    obj = _decode(line)
    cmd = obj.get(events.CMD)
    if not isinstance(cmd, str) or cmd not in events.COMMANDS:
        raise RequestError(f"unknown cmd {str(cmd)[:40]!r}")
    if cmd == events.STATUS:
        return PluginRequest(events.STATUS, "", "", "", "", (), "", "")
    pod = obj.get(events.POD)
    if not isinstance(pod, dict):
        raise RequestError("request has no 'pod' object")
    uid = pod.get(events.POD_UID, "")
    namespace = pod.get(events.POD_NAMESPACE, "")
    name = pod.get(events.POD_NAME, "")
    if not all(isinstance(x, str) for x in (uid, namespace, name)):
        raise RequestError("pod uid/namespace/name must be strings")
    if uid and not valid_uid(uid):
        raise RequestError(f"invalid pod uid {uid[:80]!r}")
    if namespace and not NAME_RE.fullmatch(namespace):
        raise RequestError(f"invalid namespace {namespace[:80]!r}")
    if name and not NAME_RE.fullmatch(name):
        raise RequestError(f"invalid pod name {name[:80]!r}")
    netns = obj.get(events.NETNS) or ""
    if not isinstance(netns, str) or (netns and not netns.startswith("/")) or "\0" in netns:
        raise RequestError("netns must be an absolute path")
    if len(netns) > PATH_MAX:
        raise RequestError(f"netns path longer than {PATH_MAX} characters")
    ips = parse_ips(obj.get(events.IPS))
    mode = obj.get(events.MODE, events.AMBIENT)
    if not isinstance(mode, str) or mode not in events.MODES:
        raise RequestError(f"unknown mode {str(mode)[:40]!r}")
    if cmd == events.ADD and not netns:
        raise RequestError("ADD needs the pod's netns")
    container_id = obj.get(events.CONTAINER_ID, "")
    return PluginRequest(cmd, uid, namespace, name, netns, ips, mode,
                         container_id[:1024] if isinstance(container_id, str) else "",
                         parse_removes(obj.get(events.REMOVES)) if cmd == events.DEL else None)


def parse_removes(raw: Any) -> tuple[str, str] | None:
    """A DEL's `removes` object: (backend, iptables setting); None when absent."""
    if raw is None:
        return None
    backend = raw.get(events.REMOVES_BACKEND) if isinstance(raw, dict) else None
    iptables = raw.get(events.REMOVES_IPTABLES, "") if isinstance(raw, dict) else None
    if backend not in events.REMOVING_BACKENDS or not isinstance(iptables, str) \
            or not SETTING_RE.fullmatch(iptables):
        raise RequestError(f"'removes' must be {{\"backend\": one of {', '.join(events.REMOVING_BACKENDS)}, "
                           f"\"iptables\": a setting}}")
    return str(backend), iptables


def reply_json(outcome: Outcome) -> dict[str, Any]:
    if outcome.ok:
        return events.success_reply(outcome.state)
    return events.failure_reply(outcome.error, outcome.retry, outcome.state)
