"""Version 2 requests of the plugin socket (`cni.contract.agent_add`): the one-request ADD, validated
into a `WarmAddRequest` or refused with `RequestError` (answered, never retried).

Checked before anything acts on it: the command (ADD only), namespace and name (DNS subdomains, both
required), the pod uid (`cni.contract.pod_uid`), an absolute netns path without NUL (at most PATH_MAX;
the server then checks it is a pod's network namespace), the IPs (at most MAX_IPS, each an address or
interface), the rule backend and iptables setting (known names), the excluded namespaces (at most
MAX_EXCLUDED names). Unknown fields are ignored (a newer plugin may send more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cni.contract import agent_add, events
from cni.contract.pod_uid import valid_uid
from node_agent.serve.cni_request import NAME_RE, PATH_MAX, RequestError, parse_ips

MAX_EXCLUDED = 256
MAX_ID = 1024


@dataclass(frozen=True)
class WarmAddRequest:
    uid: str
    namespace: str
    name: str
    netns: str
    ips: tuple[str, ...]
    backend: str  # the backend the plugin writes sidecar rules with: iptables, nftables, ebpf
    iptables: str  # its iptables setting: auto, legacy, nft
    exclude_namespaces: tuple[str, ...]
    container_id: str


# what runs once a reply is sent: later(fn)
Later = Callable[[Callable[[], None]], None]


def at_once(fn: Callable[[], None]) -> None:
    """The `Later` of a caller that sends no reply of its own: fn runs now."""
    fn()


# the one-request ADD: (request, send an interim line, later) -> the final reply
WarmAddFn = Callable[[WarmAddRequest, Callable[[dict[str, Any]], None], Later], dict[str, Any]]


def speaks(obj: Any, version: int) -> bool:
    """Whether a decoded request is an object of that protocol version (`true` is no version 1)."""
    return isinstance(obj, dict) and obj.get(events.VERSION) == version \
        and not isinstance(obj.get(events.VERSION), bool)


def is_v2(obj: Any) -> bool:
    return speaks(obj, agent_add.VERSION)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RequestError(f"invalid {what} {str(value)[:80]!r}")
    return value


def parse_add_request(obj: dict[str, Any]) -> WarmAddRequest:
    if obj.get(events.CMD) != events.ADD:
        raise RequestError(f"protocol version {agent_add.VERSION} has only ADD, not {str(obj.get(events.CMD))[:40]!r}")
    pod = obj.get(events.POD)
    if not isinstance(pod, dict):
        raise RequestError("request has no 'pod' object")
    namespace = _name(pod.get(events.POD_NAMESPACE), "namespace")
    name = _name(pod.get(events.POD_NAME), "pod name")
    uid = pod.get(events.POD_UID, "")
    if not isinstance(uid, str) or (uid and not valid_uid(uid)):
        raise RequestError(f"invalid pod uid {str(uid)[:80]!r}")
    netns = obj.get(events.NETNS)
    if not isinstance(netns, str) or not netns.startswith("/") or "\0" in netns:
        raise RequestError("netns must be an absolute path")
    if len(netns) > PATH_MAX:
        raise RequestError(f"netns path longer than {PATH_MAX} characters")
    rules = obj.get(agent_add.RULES)
    if not isinstance(rules, dict):
        raise RequestError("request has no 'rules' object")
    backend = rules.get(agent_add.RULES_BACKEND)
    iptables = rules.get(agent_add.RULES_IPTABLES, "auto")
    if not isinstance(backend, str) or backend not in agent_add.BACKENDS:
        raise RequestError(f"unknown rules backend {str(backend)[:40]!r}")
    if not isinstance(iptables, str) or iptables not in agent_add.IPTABLES_SETTINGS:
        raise RequestError(f"unknown iptables setting {str(iptables)[:40]!r}")
    excluded = obj.get(agent_add.EXCLUDE_NAMESPACES, [])
    if not isinstance(excluded, list) or len(excluded) > MAX_EXCLUDED:
        raise RequestError(f"exclude_namespaces must be a list of at most {MAX_EXCLUDED} names")
    container_id = obj.get(events.CONTAINER_ID, "")
    if not isinstance(container_id, str) or len(container_id) > MAX_ID:
        raise RequestError(f"container_id must be a string of at most {MAX_ID} characters")
    return WarmAddRequest(uid, namespace, name, netns, parse_ips(obj.get(events.IPS)), backend, iptables,
                          tuple(_name(n, "excluded namespace") for n in excluded), container_id)
